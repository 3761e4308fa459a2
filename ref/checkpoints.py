"""Reading checkpoint files and checking that a state dict fits a model, shared by every network in ref/.

One reader for every weights file: PyTorch files (.pt / .pth / .ckpt / .bin, torch.load restricted to tensors),
.safetensors (ref.safetensors, memory-mapped), sharded weights (an `*.index.json` naming the shard of every tensor, as
diffusers' and transformers' save_pretrained write them above max_shard_size) and a model folder in the diffusers /
transformers layout (the weights file, or the shard index, inside it; a variant such as fp16 named in the file names).
"""
import argparse
import json
import pickle
import re
import warnings
from pathlib import Path

import torch

from ref.safetensors import load_file

ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6: a zip archive holding data.pkl and the tensor bytes
PICKLE_PROTOCOL_OPCODE = b"\x80"  # the legacy torch.save format: pickles from the first byte
EXPECTED = "expected a file written by train.py or torch.save (tensors in plain containers)"
# The weights file of a model folder as diffusers (first two) and transformers (last two) publish them.
FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                  "pytorch_model.bin")
INDEX_SUFFIX = ".index.json"  # diffusion_pytorch_model.safetensors.index.json: {"weight_map": {key: shard file}}


def variant_name(name, variant):
    """A weights file name with a variant: the variant goes before the last suffix, as diffusers' _add_variant
    (utils/hub_utils.py) and transformers name them: model.safetensors -> model.fp16.safetensors,
    diffusion_pytorch_model.safetensors.index.json -> diffusion_pytorch_model.safetensors.index.fp16.json."""
    if variant is None:
        return name
    stem, _, suffix = name.rpartition(".")
    return f"{stem}.{variant}.{suffix}"


def folder_variants(folder):
    """The variants whose weights a model folder holds (fp16, ...), from its file names."""
    names = [name for weights in FOLDER_WEIGHTS for name in (weights, weights + INDEX_SUFFIX)]
    patterns = [re.escape(variant_name(name, "@")).replace("@", r"(\w+)") for name in names]
    return sorted({match[1] for path in folder.iterdir() for pattern in patterns
                   if (match := re.fullmatch(pattern, path.name))})


def folder_weights(folder, variant=None):
    """The weights of a model folder: the first FOLDER_WEIGHTS name present (with `variant` in it, see variant_name)
    as one file or as a shard index. -> the path of that file or index"""
    folder = Path(folder)
    for name in FOLDER_WEIGHTS:
        for candidate in (variant_name(name, variant), variant_name(name + INDEX_SUFFIX, variant)):
            if (folder / candidate).is_file():
                return folder / candidate
    variants = folder_variants(folder)
    wanted = f"the {variant} variant of " if variant else ""
    held = f"; it holds the variant(s) {', '.join(variants)}: choose one (--variant)" if variants else ""
    raise ValueError(f"{folder} is a folder holding {wanted}none of {', '.join(FOLDER_WEIGHTS)} or their "
                     f"{INDEX_SUFFIX} shard index (a diffusers or transformers model folder was expected){held}")


def read_sharded(index_path):
    """The tensors of sharded weights: the index's weight_map names the shard file (beside the index) of every key;
    each shard read once (read_checkpoint: .safetensors memory-mapped). A key its shard lacks, or a shard holding keys
    the index does not list, raises naming them. -> {key: tensor}"""
    try:
        weight_map = json.loads(Path(index_path).read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{index_path}: expected a shard index, a JSON object with a \"weight_map\" of tensor names "
                         f"to shard files ({type(error).__name__}: {error})") from None
    tensors = {}
    for shard in shards:
        contents = read_checkpoint(Path(index_path).parent / shard)
        listed = {key for key, file in weight_map.items() if file == shard}
        missing, extra = sorted(listed - set(contents)), sorted(set(contents) - listed)
        if missing or extra:
            raise ValueError(f"{index_path}: shard {shard} does not hold what the index lists: "
                             f"{len(missing)} missing ({', '.join(missing[:3])}), {len(extra)} unlisted "
                             f"({', '.join(extra[:3])})")
        tensors |= contents
    return tensors


def read_checkpoint(path, variant=None):
    """The contents of a weights file: .safetensors -> {name: tensor} (memory-mapped); a shard index (*.index.json) ->
    its shards' tensors (read_sharded); a folder -> its weights (folder_weights, `variant` choosing the files); any
    other file -> read_torch_file. Every failure is a ValueError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = folder_weights(path, variant)
    if re.search(r"\.index(\.\w+)?\.json$", path.name):
        return read_sharded(path)
    return load_file(path) if path.suffix == ".safetensors" else read_torch_file(path)


def read_torch_file(path):
    """torch.load restricted to tensors and plain containers, plus the argparse.Namespace that the DiT, SiT and IG
    training scripts store under "args". A file that is not such a checkpoint (missing, empty, another format, cut
    short, or holding other Python objects, which a weights-only load refuses and this reader never loads) raises a
    ValueError saying what the file is and what was expected."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as error:
        raise ValueError(f"cannot open {path}: {error.strerror}") from None
    if not head:
        raise ValueError(f"{path} is empty; {EXPECTED}")
    if not head.startswith((ZIP_MAGIC, PICKLE_PROTOCOL_OPCODE)):
        raise ValueError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle; its first bytes are "
                         f"{head[:8]!r}); {EXPECTED}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            contents = torch.load(path, map_location="cpu", weights_only=True)
        for warning in caught:  # kept for a file that loads; one that does not gets the error line alone
            warnings.warn(warning.message, warning.category)
        return contents
    except pickle.UnpicklingError as error:  # the weights-only unpickler met something other than tensors
        raise ValueError(f"{path} holds objects a weights-only load refuses ({first_sentence(error)}); {EXPECTED}. "
                         f"Loading such a file unrestricted can run code from it, so it is not read") from None
    except Exception as error:  # zip or pickle stream cut short or damaged: torch.load's errors vary with the bytes
        archive = "zip archive" if head.startswith(ZIP_MAGIC) else "pickle"
        raise ValueError(f"{path} is a {archive} that torch.load cannot read ({first_sentence(error)}): a checkpoint "
                         f"cut short or damaged, or another kind of file; {EXPECTED}") from None


def first_sentence(error):
    """The gist of a torch.load error: the weights-only unpickler's own reason (without torch's advice to load
    unsafely) or the first sentence of a reader error (without the C++ assertion's location)."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1].strip()
    text = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", text)
    return re.split(r"\.\s|\n", text)[0].strip() or type(error).__name__


def check_state_fits(model, state, original_key, optional_prefixes=()):
    """Raise a ValueError naming every missing key, unexpected key (as the file names it, `original_key`) and shape
    mismatch of `state` against `model`, before anything is copied. Keys under `optional_prefixes` may be missing."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state and not key.startswith(tuple(optional_prefixes))]
    unexpected = [original_key[key] for key in state if key not in expected]
    mismatched = [f"{original_key[key]} expected {tuple(expected[key].shape)}, got {tuple(state[key].shape)}"
                  for key in state if key in expected and state[key].shape != expected[key].shape]
    problems = [f"{label} ({len(items)}): " + "; ".join(items) for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)) if items]
    if problems:
        raise ValueError(f"checkpoint does not fit this {type(model).__name__}:\n  " + "\n  ".join(problems))


def misfit_line(error):
    """check_state_fits's error in one line: each kind of problem with its count and first key."""
    problems = str(error).splitlines()[1:]  # "  missing keys (194): key; key; ..."
    return "; ".join(label.strip() + ", e.g. " + keys.split("; ")[0]
                     for label, keys in (line.split(": ", 1) for line in problems))


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def strip_wrappers(key):
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return strip_wrappers(key[len(prefix):])
    return key


def read_expected(path, expected, variant=None):
    """read_checkpoint, with `expected` (what the caller wants, in words) in every error, a missing path included."""
    if not Path(path).exists():
        raise ValueError(f"{path}: no such file ({expected} expected)")
    try:
        return read_checkpoint(path, variant)
    except ValueError as error:
        raise ValueError(f"{error}; here {expected} were expected") from None


def read_state_dict(path, expected, prefer="ema", variant=None):
    """The state dict in a weights file or model folder (read_checkpoint; `variant` chooses a folder's files), wrappers
    stripped (unwrap_state). `expected` (what the caller wants, in words) goes into every error.
    -> {key: tensor}, {key: the key in the file}"""
    contents = read_expected(path, expected, variant)
    if not isinstance(contents, dict):
        raise ValueError(f"{path} holds a {type(contents).__name__}, not a state dict ({expected} expected)")
    return unwrap_state(contents, prefer)


def unwrap_state(checkpoint, prefer="ema"):
    """The state dict inside a checkpoint dict: an LDM / Lightning file {"state_dict": ...}, a training checkpoint
    {"ema": ..., "model": ...} (`prefer` picks, falling back to the other), or a raw state dict; wrapper prefixes
    stripped from its keys. -> {key: tensor}, {key: the key in the file}"""
    wrapped = [checkpoint[name] for name in ("state_dict", prefer, "ema", "model")
               if isinstance(checkpoint.get(name), dict)]
    raw = wrapped[0] if wrapped else checkpoint
    original = {strip_wrappers(key): key for key in raw}
    return {key: raw[file_key] for key, file_key in original.items()}, original
