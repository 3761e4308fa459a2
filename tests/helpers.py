"""Helpers shared by the test modules (no test module imports another)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import train


def train_error(argv, capsys):
    """train.main(argv) must stop with exit status 2; -> what it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(list(map(str, argv)))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def assert_same_state(a, b):
    """Nested dicts / lists of tensors and numbers, bitwise equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def randomise(model, seed=1, scale=0.1):
    """Random weights everywhere, norm scales near 1 (1-d parameters: 1 + noise): zero inits (LDM's residual branches,
    ControlNet's zero convs) would otherwise hide what a test looks at. -> model"""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator) + (parameter.ndim == 1))
    return model


def write_image(path, pixels, mode=None):
    """pixels (H, W[, 3]) uint8 as the image file `path`. -> its name"""
    Image.fromarray(pixels, mode).save(path) if mode else Image.fromarray(pixels).save(path)
    return path.name


def write_folder(folder, task, samples=4, width=None, height=None, size=16, classes=4, generator=None):
    """A metadata.jsonl folder (ref/control_data.py) of `samples` lines: random images with controls of the task's
    kind (label maps of `classes` classes, row 0 unlabelled, with random hints; or grey maps constant on 4 x 4 blocks,
    what 4 x 4 latents hold), width x height pixels (default (size + 4) x size), drawn from `generator` (default: a
    fresh one seeded 0). -> folder"""
    generator = generator or np.random.default_rng(0)
    width, height = width or size + 4, height or size
    folder.mkdir()
    lines = []
    for index in range(samples):
        line = dict(image=write_image(folder / f"image{index}.png",
                                      generator.integers(0, 256, (height, width, 3), dtype=np.uint8)),
                    caption=["a cat", "the cat", "", "a tat"][index % 4])
        if task == "segmentation":
            labels = generator.integers(0, classes, (height, width), dtype=np.uint8)
            labels[0] = 255
            line["control"] = write_image(folder / f"labels{index}.png", labels)
            line["hint"] = write_image(folder / f"hint{index}.png",
                                       generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
        else:
            blocks = generator.integers(0, 256, (height // 4, width // 4), dtype=np.uint8)
            line["control"] = write_image(folder / f"depth{index}.png", np.kron(blocks, np.ones((4, 4), np.uint8)))
        lines.append(json.dumps(line))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
