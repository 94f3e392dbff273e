"""SDXL conditioning where the trainer builds it: micro-conditioning time ids, the two text encoders,
and winners stacked on losers with each image's own size and crop (training and held-out paths).

Expected time ids are written out by hand from the image sizes: an image of h × w is resized so its
shorter side is 32 (the other side ``int(32 · long / short)``) and center-cropped to 32 × 32 at
``(round(slack_h / 2), round(slack_w / 2))``; SDXL's ids are (original h, w, crop top, left, target
h, w).
"""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffusion_dpo.models.families.sdxl import sdxl_time_ids
from diffusion_dpo.models.loading import encode_prompts, load_components
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.data_setup import build_train_data, make_loader
from diffusion_dpo.training.models import setup_models
from diffusion_dpo.training.step import compute_batch_loss
from diffusion_dpo.training.validation import encode_heldout_pairs, heldout_accuracy

# (h, w) -> the time ids of that image at resolution 32, by hand (see the module docstring)
SIZES = {
    (48, 40): [48, 40, 3, 0, 32, 32],  # → 38 × 32, slack 6 × 0, crop (3, 0)
    (32, 64): [32, 64, 0, 16, 32, 32],  # → 32 × 64, slack 0 × 32, crop (0, 16)
    (36, 45): [36, 45, 0, 4, 32, 32],  # → 32 × 40, slack 0 × 8, crop (0, 4)
    (50, 50): [50, 50, 0, 0, 32, 32],  # → 32 × 32, no slack
}
# Pick-a-Pic rows: (caption, jpg_0 size, jpg_1 size, label_0). Row 1's second image won (label_0 = 0),
# so its winner is the (36, 45) image: the ids must follow the winner, not the column.
ROWS = [
    ("a red circle on a blue background", (48, 40), (32, 64), 1.0),
    ("a green square on a white background", (50, 50), (36, 45), 0.0),
]
WINNER = [SIZES[(48, 40)], SIZES[(36, 45)]]
LOSER = [SIZES[(32, 64)], SIZES[(50, 50)]]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _png(h: int, w: int, color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sized_pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("sized") / "pairs.parquet"
    table = pa.table(
        {
            "caption": [r[0] for r in ROWS],
            "jpg_0": [_png(*r[1], (200, 30, 30)) for r in ROWS],
            "jpg_1": [_png(*r[2], (30, 30, 200)) for r in ROWS],
            "label_0": [r[3] for r in ROWS],
            "label_1": [1.0 - r[3] for r in ROWS],
        }
    )
    pq.write_table(table, path)
    return path


def _cfg(model, data, tmp_path, **overrides):
    values = dict(
        pretrained_model_name_or_path=model, dataset_name=data, output_dir=tmp_path / "o", resolution=32,
        train_batch_size=2, proportion_empty_prompts=0.0, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return parse_config([a for k, v in values.items() for a in (f"--{k}", str(v))])


class _Recorder:
    """Records the ``added_cond_kwargs`` and hidden states each call of a UNet receives."""

    def __init__(self, unet):
        self.calls = []
        unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        cond = kwargs["added_cond_kwargs"]
        hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        self.calls.append(
            {k: v.detach().clone() for k, v in cond.items()} | {"hidden": hidden.detach().clone()}
        )


def test_sdxl_time_ids_by_hand():
    sizes = torch.tensor([[1024, 768], [512, 2048]])
    crops = torch.tensor([[0, 128], [37, 5]])
    ids = sdxl_time_ids(sizes, crops, 1024)
    assert ids.dtype == torch.float32
    assert ids.tolist() == [[1024, 768, 0, 128, 1024, 1024], [512, 2048, 37, 5, 1024, 1024]]


def test_encode_prompts_sdxl_uses_both_penultimate_states_and_the_projected_pool(tiny_sdxl_path):
    """hidden = [penultimate layer of encoder 1 ‖ penultimate layer of encoder 2] on the feature axis;
    pooled = encoder 2's text projection of its final-layer-normed state at the first EOS token.
    Checked against hooks on the encoders' second-to-last layers and a projection by hand."""
    comps = load_components(str(tiny_sdxl_path))
    captions = ["a red circle", "a big blue square on a white background"]
    penultimate = []
    for encoder in comps.text_encoders:
        # transformers 5's CLIPTextModel is the text transformer itself; ...WithProjection wraps one
        layer = getattr(encoder, "text_model", encoder).encoder.layers[-2]
        layer.register_forward_hook(lambda m, i, o: penultimate.append(o[0] if isinstance(o, tuple) else o))
    hidden, pooled = encode_prompts(comps, captions, "cpu")
    assert hidden.shape == (2, 16, 64) and pooled.shape == (2, 32)
    assert len(penultimate) == 2
    torch.testing.assert_close(hidden[..., :32], penultimate[0], rtol=0, atol=0)
    torch.testing.assert_close(hidden[..., 32:], penultimate[1], rtol=0, atol=0)

    tokenizer, encoder = comps.tokenizers[1], comps.text_encoders[1]
    ids = tokenizer(
        captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    ).input_ids
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    first_eos = (ids == eos).int().argmax(dim=1)
    assert first_eos.tolist() == [4, 9]  # BOS + 3 and BOS + 8 word tokens (every word is one token)
    with torch.no_grad():
        final = encoder.text_model(ids).last_hidden_state  # after the final layer norm
        by_hand = encoder.text_projection(final[torch.arange(2), first_eos])
        last_layer = encoder.text_model(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(pooled, by_hand, rtol=1e-6, atol=1e-6)
    # the penultimate states are not the last ones: the check above could tell them apart
    assert not torch.allclose(hidden[..., 32:], last_layer, atol=1e-3)


def test_compute_batch_loss_stacks_winner_and_loser_conditioning(tmp_path, tiny_sdxl_path, sized_pairs):
    """Row i of the 2B UNet batch carries pair i's winner's size and crop, row B + i its loser's;
    text embeddings and hidden states are pair i's caption's on both rows (policy and reference)."""
    cfg = _cfg(tiny_sdxl_path, sized_pairs, tmp_path)
    models = setup_models(cfg, "cpu")
    policy, reference = _Recorder(models.unet), _Recorder(models.ref_unet)
    g = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values_w": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "pixel_values_l": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "captions": ["a red circle", "a blue square"],
        "indices": torch.tensor([0, 1]),
        "original_sizes_w": torch.tensor([[48, 40], [100, 60]]),
        "original_sizes_l": torch.tensor([[32, 64], [70, 90]]),
        "crop_top_lefts_w": torch.tensor([[3, 0], [10, 2]]),
        "crop_top_lefts_l": torch.tensor([[0, 16], [5, 7]]),
    }
    compute_batch_loss(models, batch, cfg)
    want = [
        [48, 40, 3, 0, 32, 32],
        [100, 60, 10, 2, 32, 32],
        [32, 64, 0, 16, 32, 32],
        [70, 90, 5, 7, 32, 32],
    ]
    with torch.no_grad():
        ids = models.components.tokenizers[1](batch["captions"], padding="max_length", max_length=16,
                                              truncation=True, return_tensors="pt").input_ids  # fmt: skip
        pooled = models.components.text_encoders[1](ids).text_embeds
    for rec in (policy, reference):
        (call,) = rec.calls
        assert call["time_ids"].tolist() == want
        torch.testing.assert_close(call["text_embeds"], torch.cat([pooled, pooled]))
        torch.testing.assert_close(call["hidden"][:2], call["hidden"][2:], rtol=0, atol=0)
        assert not torch.equal(call["hidden"][0], call["hidden"][1])


def test_training_batches_carry_each_images_own_size(tmp_path, tiny_sdxl_path, sized_pairs):
    """From the parquet to the UNet: the training loader's sizes and crops (winner swapped in when
    label_0 = 0) arrive as the time ids of rows i (winner) and B + i (loser)."""
    cfg = _cfg(tiny_sdxl_path, sized_pairs, tmp_path)
    models = setup_models(cfg, "cpu")
    policy = _Recorder(models.unet)
    data = build_train_data(cfg, is_sdxl=True)
    data.start_epoch(0)
    (batch,) = list(data.loader)
    compute_batch_loss(models, batch, cfg)
    order = batch["indices"].tolist()
    assert sorted(order) == [0, 1]
    want = [WINNER[i] for i in order] + [LOSER[i] for i in order]
    assert policy.calls[0]["time_ids"].tolist() == want


def test_heldout_pairs_keep_winner_and_loser_time_ids(tmp_path, tiny_sdxl_path, sized_pairs):
    """encode_heldout_pairs stores [winners; losers] time ids in stored order, and heldout_accuracy
    hands each slice of pairs to the UNet as its winners then its losers; a model scored against
    itself is at exactly 0.5."""
    cfg = _cfg(tiny_sdxl_path, sized_pairs, tmp_path)
    models = setup_models(cfg, "cpu")
    loader = make_loader(sized_pairs, resolution=32, batch_size=2, sdxl=True)
    pairs = encode_heldout_pairs(models, loader, max_pairs=2, resolution=32)
    assert pairs.cond["time_ids"].tolist() == WINNER + LOSER
    pooled = pairs.cond["text_embeds"]
    torch.testing.assert_close(pooled[:2], pooled[2:], rtol=0, atol=0)

    policy = _Recorder(models.unet)
    assert heldout_accuracy(models, pairs, timesteps=(500,), batch_size=1) == 0.5
    assert [c["time_ids"].tolist() for c in policy.calls] == [
        [WINNER[0], LOSER[0]],
        [WINNER[1], LOSER[1]],
    ]
    torch.testing.assert_close(policy.calls[1]["text_embeds"], pooled[[1, 3]], rtol=0, atol=0)
