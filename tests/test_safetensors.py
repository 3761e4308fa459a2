"""ref/safetensors: a file written byte by byte from the format's specification, round trips for every dtype, the
private memory map, and a clear error for each kind of bad file."""
import json
import struct

import numpy as np
import pytest
import torch

from ref.safetensors import DTYPES, load_file, read_metadata, save_file

torch.set_num_threads(1)


def write_raw(path, header, buffer, header_length=None):
    """A file as the specification lays it out: u64 little-endian header length, the JSON header, the buffer."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(header_bytes) if header_length is None else header_length
    path.write_bytes(struct.pack("<Q", length) + header_bytes + buffer)
    return path


def test_reads_a_file_written_from_the_specification(tmp_path):
    weight = np.arange(6, dtype="<f4").reshape(2, 3) / 4  # C order, little-endian
    step = np.array([7, -1], dtype="<i8")
    half = np.array([1.5, -2.0, 65504.0], dtype="<f2")
    flags = bytes([1, 0, 1])
    buffer = step.tobytes() + weight.tobytes() + half.tobytes() + flags  # 16 + 24 + 6 + 3 bytes
    header = {
        "__metadata__": {"format": "pt"},
        "weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [16, 40]},
        "step": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]},
        "half": {"dtype": "F16", "shape": [3], "data_offsets": [40, 46]},
        "flags": {"dtype": "BOOL", "shape": [3], "data_offsets": [46, 49]},
        "scalar": {"dtype": "F32", "shape": [], "data_offsets": [49, 53]},
    }
    buffer += struct.pack("<f", 0.25)
    path = write_raw(tmp_path / "spec.safetensors", header, buffer)
    tensors = load_file(path)
    assert set(tensors) == {"weight", "step", "half", "flags", "scalar"}
    assert tensors["weight"].dtype == torch.float32 and torch.equal(tensors["weight"], torch.from_numpy(weight))
    assert torch.equal(tensors["step"], torch.tensor([7, -1]))
    assert torch.equal(tensors["half"], torch.tensor([1.5, -2.0, 65504.0], dtype=torch.float16))
    assert torch.equal(tensors["flags"], torch.tensor([True, False, True]))
    assert tensors["scalar"].shape == () and tensors["scalar"].item() == 0.25
    assert read_metadata(path) == {"format": "pt"}


def test_bf16_bytes_are_the_upper_half_of_float32(tmp_path):
    """BF16 is the top 16 bits of an IEEE float32: written here by hand, independently of torch's bfloat16."""
    values = np.array([1.0, -3.5, 2.0 ** -10], dtype="<f4")
    upper = (values.view("<u4") >> 16).astype("<u2")
    header = {"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}
    x = load_file(write_raw(tmp_path / "bf16.safetensors", header, upper.tobytes()))["x"]
    assert x.dtype == torch.bfloat16 and x.float().tolist() == values.tolist()


def random_tensor(dtype, shape, generator):
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype) * 1e3
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64).to(dtype)


def test_round_trip_every_dtype_bit_exact(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t_{name}": random_tensor(dtype, (3, 5), generator) for name, dtype in DTYPES.items()}
    tensors |= {"scalar": torch.tensor(2.5, dtype=torch.bfloat16), "empty": torch.zeros(0, 4),
                "odd": torch.arange(3, dtype=torch.uint8), "strided": torch.arange(12.0).reshape(3, 4).t()}
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"note": "round trip"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        # bit-exact: compare the raw bytes (NaN-safe, -0.0 kept)
        assert torch.equal(loaded[name].contiguous().reshape(-1).view(torch.uint8),
                           tensor.contiguous().reshape(-1).view(torch.uint8)), name
    assert read_metadata(path) == {"note": "round trip"}
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    assert header_length % 8 == 0 and raw[8 + header_length - 1:8 + header_length] in (b"}", b" ")


def test_loaded_tensors_map_the_file_privately(tmp_path):
    path = tmp_path / "map.safetensors"
    save_file({"x": torch.zeros(1000)}, path)
    before = path.read_bytes()
    x = load_file(path)["x"]
    assert not x.untyped_storage().resizable()  # a file mapping, not an allocation of its own
    x += 1  # copy-on-write: the file keeps its zeros
    assert path.read_bytes() == before and torch.equal(load_file(path)["x"], torch.zeros(1000))


def test_writer_refuses_what_the_format_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        save_file({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")
    with pytest.raises(ValueError, match="metadata"):
        save_file({"x": torch.zeros(2)}, tmp_path / "m.safetensors", metadata={"n": 1})
    assert not list(tmp_path.iterdir())


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I32", "shape": [1], "data_offsets": [8, 12]}}


def with_entry(name, **changes):
    return {**GOOD, name: {**GOOD[name], **changes}}


BAD_FILES = {
    "truncated": (lambda p: p.write_bytes(b"\x10\x00\x00"), "truncated"),
    "header past the end": (lambda p: write_raw(p, GOOD, bytes(12), header_length=10_000), "runs past the end"),
    "absurd header": (lambda p: write_raw(p, GOOD, bytes(12), header_length=2 ** 40), "absurd"),
    "not JSON": (lambda p: write_raw(p, b"{not json}      ", bytes(12)), "not JSON"),
    "not an object": (lambda p: write_raw(p, b"[1, 2]  ", b""), "not an object"),
    "unknown dtype": (lambda p: write_raw(p, with_entry("a", dtype="F8"), bytes(12)), "unknown dtype 'F8'"),
    "out of range": (lambda p: write_raw(p, GOOD, bytes(10)), "truncated: tensor "),
    "overlap": (lambda p: write_raw(p, with_entry("b", data_offsets=[4, 8], shape=[1]), bytes(8)), "overlap"),
    "size mismatch": (lambda p: write_raw(p, with_entry("a", shape=[3]), bytes(12)), "needs 12"),
    "hole": (lambda p: write_raw(p, with_entry("b", data_offsets=[12, 16]), bytes(16)), "belong to no tensor"),
    "trailing bytes": (lambda p: write_raw(p, GOOD, bytes(20)), "cover 12"),
    "bad offsets": (lambda p: write_raw(p, with_entry("a", data_offsets=[8, 0]), bytes(12)), "begin <= end"),
    "bad shape": (lambda p: write_raw(p, with_entry("a", shape=[-2]), bytes(12)), "non-negative"),
    "bad metadata": (lambda p: write_raw(p, {**GOOD, "__metadata__": {"n": 3}}, bytes(12)), "__metadata__"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_get_a_clear_error(tmp_path, kind):
    write, message = BAD_FILES[kind]
    path = tmp_path / "bad.safetensors"
    write(path)
    with pytest.raises(ValueError, match=message) as error:
        load_file(path)
    assert str(error.value).startswith(f"{path}: not a valid .safetensors file")


def test_good_file_of_the_bad_file_tests_reads(tmp_path):
    """The reference for the cases above: the same header with a buffer of the right size is accepted."""
    tensors = load_file(write_raw(tmp_path / "good.safetensors", GOOD, struct.pack("<ffi", 1.0, 2.0, 3)))
    assert tensors["a"].tolist() == [1.0, 2.0] and tensors["b"].tolist() == [3]
