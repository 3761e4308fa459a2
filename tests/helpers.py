"""Helpers shared by the test modules (no test module imports another)."""
import pytest
import torch

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
