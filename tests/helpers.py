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
