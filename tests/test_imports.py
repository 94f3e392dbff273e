"""Every module imports (catches undefined names and broken optional paths), and the install gives a
consistent torch + torchvision pair, so open_clip works."""

import importlib
import pkgutil

import diffusion_dpo


def test_every_module_of_the_package_imports():
    names = [m.name for m in pkgutil.walk_packages(diffusion_dpo.__path__, prefix="diffusion_dpo.")]
    assert len(names) > 20
    for name in names:
        importlib.import_module(name)


def test_dependencies_import_together():
    import diffusers
    import open_clip
    import torch
    import torchvision
    import transformers

    # torchvision's compiled ops must match this torch build (a mismatch fails on first use)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]
    assert open_clip.list_models() and diffusers.__version__ and transformers.__version__
