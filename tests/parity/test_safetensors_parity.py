"""Parity of ref/safetensors with the reference implementation (the `safetensors` package): each reads the other's
files, every dtype, bit-exact. Skipped when the package is absent (requirements-parity.txt installs it)."""
import pytest
import torch

from ref.safetensors import DTYPES, load_file, read_metadata, save_file

reference = pytest.importorskip("safetensors.torch")

torch.set_num_threads(1)


def tensors():
    generator = torch.Generator().manual_seed(0)
    made = {}
    for name, dtype in DTYPES.items():
        values = torch.randn(4, 3, generator=generator) * 100
        made[f"{name.lower()}"] = values > 0 if dtype == torch.bool else values.to(dtype)
    return made | {"scalar": torch.tensor(1.5), "empty": torch.zeros(2, 0, dtype=torch.float16)}


def assert_bit_equal(got, expected):
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_we_read_the_reference_writer(tmp_path):
    path = tmp_path / "reference.safetensors"
    reference.save_file(tensors(), path, metadata={"format": "pt"})
    assert_bit_equal(load_file(path), tensors())
    assert read_metadata(path) == {"format": "pt"}


def test_the_reference_reads_our_writer(tmp_path):
    path = tmp_path / "ours.safetensors"
    save_file(tensors(), path, metadata={"format": "pt"})
    assert_bit_equal(reference.load_file(path), tensors())


def test_same_bytes_as_the_reference_writer(tmp_path):
    """Header (compact JSON, metadata first, spaces to a multiple of 8) and buffer byte for byte, for tensors whose
    buffer order both writers agree on: one dtype per element size, names in order (the reference sorts by dtype,
    then name; this writer by element size, keeping the given order)."""
    made = {"a": torch.arange(3, dtype=torch.int64), "b": torch.randn(2, 3), "c": torch.ones(5, dtype=torch.bfloat16),
            "d": torch.arange(7, dtype=torch.uint8)}
    save_file(made, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    reference.save_file(made, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
