"""Reading checkpoint files and checking that a state dict fits a model, shared by every network in ref/."""
import argparse

import torch


def read_checkpoint(path):
    """torch.load restricted to tensors and plain containers, plus the argparse.Namespace that the DiT, SiT and IG
    training scripts store under "args"."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


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


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def strip_wrappers(key):
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return strip_wrappers(key[len(prefix):])
    return key


def unwrap_state(checkpoint, prefer="ema"):
    """The state dict inside a checkpoint dict: an LDM / Lightning file {"state_dict": ...}, a training checkpoint
    {"ema": ..., "model": ...} (`prefer` picks, falling back to the other), or a raw state dict; wrapper prefixes
    stripped from its keys. -> {key: tensor}, {key: the key in the file}"""
    wrapped = [checkpoint[name] for name in ("state_dict", prefer, "ema", "model")
               if isinstance(checkpoint.get(name), dict)]
    raw = wrapped[0] if wrapped else checkpoint
    original = {strip_wrappers(key): key for key in raw}
    return {key: raw[file_key] for key, file_key in original.items()}, original
