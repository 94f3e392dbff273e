"""The LoRA reference switch (diffusion_dpo/diffusion/adapters.py): the same forward as diffusers'
``disable_adapters()``, bit for bit, with each layer's switch and the adapters' ``requires_grad`` as they
were afterwards."""

import warnings

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.tuners import lora
from peft.tuners.tuners_utils import BaseTunerLayer

from diffusion_dpo.diffusion import adapters_disabled
from diffusion_dpo.models.tiny import tiny_unet_config


def _lora_unet(targets=("to_q", "to_v")):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size=8))
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(targets))
    )
    with torch.no_grad():  # lora_B starts at zero: give the adapters an effect, as training would
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return unet


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 32, generator=g)


def _layers(unet):
    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@torch.no_grad()
def test_reference_forward_equals_diffusers_disable_adapters_and_everything_is_put_back():
    unet, x = _lora_unet(), _inputs()
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with_adapters = unet(*x).sample
    unet.disable_adapters()
    expected = unet(*x).sample
    unet.enable_adapters()
    assert not torch.equal(expected, with_adapters)  # the adapters change the output

    with adapters_disabled(unet) as base:
        assert base is unet
        assert all(layer.disable_adapters for layer in _layers(unet))
        reference = unet(*x).sample
    assert torch.equal(reference, expected)
    assert torch.equal(unet(*x).sample, with_adapters)
    assert not any(layer.disable_adapters for layer in _layers(unet))
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == trainable

    unet.disable_adapters()  # a switch already off stays off
    with adapters_disabled(unet):
        pass
    assert all(layer.disable_adapters for layer in _layers(unet))


@torch.no_grad()
def test_layers_are_found_again_when_the_adapters_change():
    unet, x = _lora_unet(), _inputs()
    with adapters_disabled(unet):
        pass  # the layers of the first adapter are found and kept
    with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point
        warnings.simplefilter("ignore", UserWarning)
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"]), adapter_name="second")
    with adapters_disabled(unet):
        assert all(layer.disable_adapters for layer in _layers(unet))
        reference = unet(*x).sample
    unet.disable_adapters()
    assert torch.equal(reference, unet(*x).sample)


@torch.no_grad()
def test_a_layer_class_with_its_own_switch_is_switched_through_it(monkeypatch):
    unet, x = _lora_unet(), _inputs()
    unet.disable_adapters()
    expected = unet(*x).sample
    unet.enable_adapters()
    calls = []

    def recording(self, enabled):
        calls.append(enabled)
        BaseTunerLayer.enable_adapters(self, enabled)

    monkeypatch.setattr(lora.Linear, "enable_adapters", recording)
    with adapters_disabled(unet):
        reference = unet(*x).sample
    assert torch.equal(reference, expected)
    n = len(_layers(unet))
    assert calls == [False] * n + [True] * n


def test_a_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match="has no adapters"):
        with adapters_disabled(UNet2DConditionModel(**tiny_unet_config(sample_size=8))):
            pass
