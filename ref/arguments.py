"""Checks of the values every script is given, made before anything is read, computed or written: counts, finite
numbers, intervals of t, seeds, a device this torch can use, the output folder, arrays of the documented shape.
Each raises ValueError naming the flag (or file) and what was expected; the scripts catch it with their other
bad-input errors and end with one `error:` line and exit status 2 (ref.runtime.exit_with_error).
"""
import math
import tempfile
from pathlib import Path

import torch

SEED_LIMIT = 2 ** 32  # numpy's seeds (np.random.seed, a SeedSequence word) are 0 .. 2**32 - 1


def flag(name):
    """A field name as its command-line flag: ig_interval -> --ig-interval."""
    return "--" + name.replace("_", "-")


def present(args, names):
    """{name: value} of the attributes of `args` (a Namespace or a dict) among `names` that are set (not None)."""
    values = args if isinstance(args, dict) else vars(args)
    return {name: values[name] for name in names if values.get(name) is not None}


def check_counts(values, low=1):
    """Every count in `values` ({name: int}) at least `low` (1: positive, 0: zero or more)."""
    for name, value in values.items():
        if value < low:
            raise ValueError(f"{flag(name)} must be {'positive' if low else 'zero or more'}, got {value}")


def check_finite(values):
    """Every number in `values` ({name: float}) finite (not nan, not +-inf)."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{flag(name)} must be a finite number, got {value}")


def check_intervals(values):
    """Every interval of t in `values` ({name: (low, high)}) within 0 <= low <= high <= 1 (t = 1 noise, 0 data): a
    reversed interval would hold no step and silently switch its guidance off."""
    for name, (low, high) in values.items():
        if not 0 <= low <= high <= 1:  # false for nan too
            raise ValueError(f"{flag(name)} must be LOW HIGH with 0 <= LOW <= HIGH <= 1 (t in [0, 1], t = 1 noise), "
                             f"got {low:g} {high:g}")


def check_seed(name, seed, count=1):
    """Seeds seed .. seed + count - 1 (sample i uses seed + i) all within numpy's 0 .. 2**32 - 1."""
    if not 0 <= seed <= SEED_LIMIT - count:
        uses = f" (its {count} samples use seed .. seed + {count - 1})" if count > 1 else ""
        raise ValueError(f"{flag(name)} must be in 0..{SEED_LIMIT - count}{uses}, got {seed}")


def usable_device(text, name="--device"):
    """A device flag's value -> the torch.device, when this torch knows the name and can run on it: 'cuda' on a
    build or machine without a CUDA device is refused here rather than deep inside the first .to(device)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"{name} must be a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {text}: this torch sees no CUDA device (a CPU build, or no GPU on this machine); "
                         f"use {name} cpu")
    return device


def check_arguments(args, counts=(), non_negative=(), finite=(), intervals=(), seeds=()):
    """The checks above on the attributes of `args` with these names (those absent or None are skipped)."""
    check_counts(present(args, counts))
    check_counts(present(args, non_negative), low=0)
    check_finite(present(args, finite))
    check_intervals(present(args, intervals))
    for name, seed in present(args, seeds).items():
        check_seed(name, seed)


def probe_write(folder, name, path):
    """Write and delete a nameless file in `folder`; failing, raise naming the flag and the path it was given."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{name} {path}: cannot write there ({error.strerror or error})") from None


def writable_folder(path, name="--out"):
    """Create the output folder `path` (and its parents) and write a file in it, before any compute: a folder that
    cannot be made or written raises, naming the flag. Call it last among a script's checks (it creates the folder).
    -> Path"""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{name} {path}: cannot create this folder ({error.strerror or error})") from None
    probe_write(path, name, path)
    return path


def writable_file(path, name="--out"):
    """A file that a script writes after its compute: not a folder, and its folder, or the nearest one above it that
    exists (the writer makes the rest), writable now. Nothing is created. -> Path"""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder; a file name was expected")
    existing = next(folder for folder in path.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise ValueError(f"{name} {path}: {existing} is a file, not a folder")
    probe_write(existing, name, path)
    return path


def check_images(shape, dtype, source):
    """An image array of the documented layout: (N, H, W, 3) or (N, H, W) uint8 (ADM's arr_0). source names it."""
    if str(dtype) != "uint8" or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3, 4)):
        raise ValueError(f"{source}: expected images (N, H, W, 3) uint8 (ADM's arr_0, channels last), got "
                         f"{tuple(shape)} {dtype}")
