"""Reading and writing `.safetensors` files (the format of huggingface/safetensors), written here.

Layout of a file:
    8 bytes      N, the header's length in bytes, an unsigned 64-bit little-endian integer
    N bytes      a JSON object {name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...} with an
                 optional "__metadata__": {str: str}; the writer pads it with spaces to a multiple of 8 bytes
    the rest     the byte buffer: every tensor's values, C order, little-endian, at [begin, end) of the buffer; the
                 tensors cover it without overlap or hole

Reading maps the file (MAP_PRIVATE: writing to a tensor never touches the file, and a 2 GB file is not copied into
memory; pages are read when used). Every defect found in the header is a ValueError naming the file and the defect.
"""
import json
import os
import struct
import sys

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit as well
METADATA_KEY = "__metadata__"


def _header_entries(header, complain):
    """Check each tensor entry of a parsed header. -> [(name, dtype, shape, begin, end)] sorted by begin."""
    entries = []
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            complain(f"tensor {name!r}: expected an object with dtype, shape and data_offsets, got {entry!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            complain(f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(type(size) is int and size >= 0 for size in shape)):
            complain(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            complain(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            complain(f"tensor {name!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but shape "
                     f"{shape} of {dtype} needs {nbytes}")
        entries.append((name, DTYPES[dtype], tuple(shape), offsets[0], offsets[1]))
    return sorted(entries, key=lambda entry: entry[3])


def read_header(path):
    """Parse and check the header of `path` without reading the tensors.

    -> (entries [(name, dtype, shape, begin, end)] in buffer order, metadata {str: str}, buffer start in the file)"""
    def complain(problem):
        raise ValueError(f"{path}: not a valid .safetensors file: {problem}")

    file_size = os.path.getsize(path)
    with open(path, "rb") as file:
        length_bytes = file.read(8)
        if len(length_bytes) < 8:
            complain(f"truncated: {file_size} bytes, too short for the 8-byte header length")
        (header_length,) = struct.unpack("<Q", length_bytes)
        if header_length > MAX_HEADER_BYTES:
            complain(f"header length {header_length} bytes is absurd (limit {MAX_HEADER_BYTES})")
        if 8 + header_length > file_size:
            complain(f"header length {header_length} runs past the end of the file ({file_size} bytes): truncated")
        header_bytes = file.read(header_length)
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        complain(f"header is not JSON ({error})")
    if not isinstance(header, dict):
        complain(f"header is JSON but not an object: {type(header).__name__}")
    metadata = header.get(METADATA_KEY, {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        complain(f"{METADATA_KEY} is not an object of strings: {metadata!r}")

    entries = _header_entries(header, complain)
    buffer_size = file_size - 8 - header_length
    position = 0
    for name, _, _, begin, end in entries:
        if begin < position:
            complain(f"tensor {name!r}: data_offsets [{begin}, {end}] overlap the previous tensor (ends at {position})")
        if begin > position:
            complain(f"bytes [{position}, {begin}) of the buffer belong to no tensor (before {name!r})")
        if end > buffer_size:
            complain(f"truncated: tensor {name!r} needs bytes [{begin}, {end}) of the buffer, the file holds "
                     f"{buffer_size} (a download or copy cut short)")
        position = end
    if position != buffer_size:
        complain(f"the buffer holds {buffer_size} bytes but the tensors cover {position}")
    return entries, metadata, 8 + header_length


def load_file(path):
    """{name: tensor} of a .safetensors file, on the CPU, each a view of one private memory map of the file (a tensor
    whose offset is not a multiple of its element size is copied instead)."""
    if sys.byteorder != "little":
        raise ValueError(f"{path}: .safetensors is little-endian; this machine is {sys.byteorder}-endian")
    entries, _, start = read_header(path)
    file_size = os.path.getsize(path)
    if file_size == start:  # no bytes to map: only empty tensors
        return {name: torch.empty(shape, dtype=dtype) for name, dtype, shape, _, _ in entries}
    file_bytes = torch.from_file(os.fspath(path), shared=False, size=file_size, dtype=torch.uint8)  # (file_size,)
    tensors = {}
    for name, dtype, shape, begin, end in entries:
        raw = file_bytes[start + begin:start + end]  # (nbytes,) uint8
        if (start + begin) % dtype.itemsize:
            raw = raw.clone()  # misaligned for a typed view
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def read_metadata(path):
    """The header's "__metadata__" ({str: str}; {} when absent)."""
    return read_header(path)[1]


def save_file(tensors, path, metadata=None):
    """Write {name: tensor} to `path` (replaced atomically: a failed write leaves no half file). Tensors go in the
    buffer by decreasing element size (stable), so every one lies at a multiple of its element size, as the reference
    writer keeps them; the header lists them in that order."""
    metadata = {} if metadata is None else metadata
    if not all(isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()):
        raise ValueError(f"{path}: metadata must map strings to strings, got {metadata!r}")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == METADATA_KEY:
            raise ValueError(f"{path}: tensor name {name!r} is not allowed")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ValueError(f"{path}: {name!r} is not a dense tensor")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: {name!r} has dtype {tensor.dtype}, which .safetensors here does not store "
                             f"(stored: {', '.join(str(dtype) for dtype in DTYPE_NAMES)})")
    ordered = sorted(tensors.items(), key=lambda item: -item[1].dtype.itemsize)
    header, position = {}, 0
    if metadata:
        header[METADATA_KEY] = metadata
    for name, tensor in ordered:
        nbytes = tensor.numel() * tensor.dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [position, position + nbytes]}
        position += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    partial = f"{path}.partial"
    with open(partial, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for _, tensor in ordered:
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
            file.write(raw.numpy().data)
    os.replace(partial, path)
