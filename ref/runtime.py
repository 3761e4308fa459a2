"""The training runtime of both papers' runs: per-sample random draws, distributed set-up, mixed precision, atomic
checkpoints and reading them back, the run log, errors, the peak FLOP/s behind MFU.

The randomness of a run is a function of its config alone: the data order is `ref.data.batch_indices(step)`, and
every random draw for a training sample (label dropout, t, the noise) comes from a generator seeded by the seed and the
sample's place in the data stream (`ref.data.stream_positions`). So a run resumed from a checkpoint continues exactly
as if it had never stopped, and the draws of a sample do not depend on the number of ranks.
"""
import contextlib
import hashlib
import json
import os
import re
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed

from ref.checkpoints import check_state_fits, read_checkpoint
from ref.configs import complete_stored_config

# ---------------------------------------------------------------------------------------------------------------------
# Per-sample random draws
# ---------------------------------------------------------------------------------------------------------------------

def stream_seed(seed, position):
    """A 64-bit seed for the training sample at `position` of the data stream of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, int(position)]).generate_state(1, np.uint64)[0])


class SampleDraws:
    """One CPU generator per sample, each seeded by that sample's own seed: a batch's draws are its samples' draws
    stacked, so they do not depend on the batch size, the batch composition or the number of ranks (EDM2's
    per-sample seeds). Every draw returns (N, *shape)."""

    def __init__(self, seeds):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def rand(self, *shape):
        return torch.stack([torch.rand(shape, generator=g) for g in self.generators])

    def randn(self, *shape):
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])

    def randint(self, high, *shape):
        return torch.stack([torch.randint(high, shape, generator=g) for g in self.generators])

    def randn_like(self, x):
        """The `randn_like` of ref.samplers: (N, ...) standard normal, row i from generator i, on x's device."""
        return self.randn(*x.shape[1:]).to(x)


# ---------------------------------------------------------------------------------------------------------------------
# Distributed: torchrun or one process
# ---------------------------------------------------------------------------------------------------------------------

class Distributed(NamedTuple):
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


@contextlib.contextmanager
def distributed():
    """With torchrun's RANK / WORLD_SIZE / LOCAL_RANK: a process group, NCCL on cuda:LOCAL_RANK when CUDA is there,
    else gloo on the CPU. Without them: one process on cuda:0 or the CPU. Yields a Distributed; tears down on exit.
    On CUDA, TF32 matmuls and convolutions are switched on (DiT / SiT train so)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        device = torch.device("cpu")
    launched = "RANK" in os.environ
    if launched:
        if device.type == "cuda":
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    try:
        yield Distributed(rank, world_size, device)
        if launched:  # no rank tears its group down while another still works (gloo aborts the early one)
            torch.distributed.barrier()
    finally:
        if launched:
            torch.distributed.destroy_process_group()


def all_reduce_mean(value):
    """Mean over the ranks of a scalar tensor (itself in one process)."""
    if torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value


def gather_to_main(obj):
    """Every rank's `obj` as a list on rank 0 (rank order), None elsewhere; [obj] in one process."""
    if not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


def autocast(device, bf16):
    """The one mixed-precision context of training and sampling: bf16 autocast on CUDA when asked, else nothing."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints, the run log, errors
# ---------------------------------------------------------------------------------------------------------------------

def atomic_write(path, write):
    """write(file) into path.tmp in the same folder, flushed to disk, then renamed over `path` (os.replace is atomic
    within a file system): a crash at any moment leaves the old file or the new one, never part of one. A stale
    .tmp from a killed process is overwritten by the next write."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_checkpoint(path, model, ema, optimizer, step, config):
    """{model, ema, opt, step, args} as DiT / SiT store them; args is the config (a plain dict); and `digests`, the
    CRC-32 of every tensor and value (contents_digests), which read_run_checkpoint verifies."""
    checkpoint = dict(model=model.state_dict(), ema=ema.state_dict(), opt=optimizer.state_dict(), step=step,
                      args=config)
    checkpoint["digests"] = contents_digests(checkpoint)
    atomic_write(path, lambda file: torch.save(checkpoint, file))


def tensor_bytes(tensor):
    """A tensor's values in C order as (numel * itemsize,) uint8 numpy, no copy when it is contiguous on the CPU."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def contents_digests(contents, name=""):
    """{path: CRC-32 as 8 hex digits} of every leaf of nested dicts / lists: of a tensor's dtype, shape and bytes, of
    any other value's repr. Paths join the keys with "/" ("model/blocks.0.attn.qkv.weight", "opt/state/3/exp_avg",
    "step"). CRC-32, not a cryptographic hash: it is there to catch bytes damaged on disk or in a copy, and zlib's
    runs at memory speed (blake2b measured 5x slower here, which doubled a checkpoint's save time: README)."""
    if isinstance(contents, dict):
        items = contents.items()
    elif isinstance(contents, (list, tuple)):
        items = enumerate(contents)
    elif isinstance(contents, torch.Tensor):
        layout = zlib.crc32(f"{contents.dtype} {tuple(contents.shape)}".encode())
        return {name: f"{zlib.crc32(tensor_bytes(contents), layout):08x}"}
    else:
        return {name: f"{zlib.crc32(repr(contents).encode()):08x}"}
    return {path: value for key, item in items
            for path, value in contents_digests(item, f"{name}/{key}" if name else str(key)).items()}


def file_digest(path, chunk_bytes=1 << 24):
    """CRC-32 of a file's bytes as 8 hex digits (prepare.py's shards, recorded in prepare.json)."""
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def damaged_files(folder, digests):
    """The names in {name: file_digest} whose file in `folder` is missing or holds other bytes."""
    return [name for name, digest in digests.items()
            if not (Path(folder) / name).is_file() or file_digest(Path(folder) / name) != digest]


def verify_digests(checkpoint, path):
    """Take the stored `digests` out of a checkpoint and compare them with its contents: a tensor or value that
    differs (bytes garbled on disk or in transit) raises ValueError naming the file and the first damaged entry. A
    checkpoint written before digests were stored has none and is taken as it is."""
    stored = checkpoint.pop("digests", None)
    if stored is None:
        return
    found = contents_digests(checkpoint)
    damaged = [entry for entry in sorted(stored.keys() | found.keys()) if stored.get(entry) != found.get(entry)]
    if damaged:
        raise ValueError(f"{path} is damaged: {len(damaged)} of its {len(stored)} tensors and values differ from the "
                         f"digests written with them (first: {damaged[0]}); it is not used")


def checkpoint_file(run):
    """The checkpoint of RUN: the file itself, or a run folder's latest.pt."""
    path = Path(run)
    path = path / "latest.pt" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    return path


def read_run_checkpoint(path):
    """A checkpoint written by train.py: {model, ema, opt, step, args}, args the config with its `job`, completed
    with the old default of every field added since it was written (ref.configs.complete_stored_config). Anything
    else (a missing, truncated or foreign file, or one whose contents differ from its stored digests) raises ValueError
    naming the file."""
    checkpoint = read_checkpoint(path)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), dict)
            and isinstance(checkpoint["args"].get("job"), str)):
        raise ValueError(f"{path} is not a checkpoint written by train.py (no config with a known job under 'args')")
    verify_digests(checkpoint, path)
    checkpoint["args"] = complete_stored_config(checkpoint["args"])
    return checkpoint


def check_job(checkpoint, expected_job, path):
    """A train.py checkpoint of another job than `expected_job` raises ValueError naming both."""
    if checkpoint["args"]["job"] != expected_job:
        raise ValueError(f"{path} is a {checkpoint['args']['job']!r} run; a {expected_job!r} run was expected here")


def load_trained_network(path, expected_job, build, weights="ema", checkpoint=None):
    """The network a train.py run of `expected_job` trained, with its `weights` ("ema" or "model"), frozen, on the
    CPU, and its config. build(config): the untrained network of a config. checkpoint: the file's contents when the
    caller has read them already. A run of another job raises ValueError."""
    checkpoint = read_run_checkpoint(path) if checkpoint is None else checkpoint
    check_job(checkpoint, expected_job, path)
    config = checkpoint["args"]
    with torch.device("meta"):  # no random init of weights that are overwritten next
        network = build(config)
    check_state_fits(network, checkpoint[weights], {key: key for key in checkpoint[weights]})
    network.load_state_dict(checkpoint[weights], assign=True)
    return network.requires_grad_(False).eval(), config


def move_modules(device, *holders):
    """Every nn.Module among the attributes of `holders` (a run, its InnerControl terms) onto the device."""
    for holder in holders:
        for name, value in vars(holder).items():
            if isinstance(value, torch.nn.Module):
                setattr(holder, name, value.to(device))


def weights_digest(state_dict):
    """sha256 of every tensor's bytes in key order: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(tensor_bytes(state_dict[key]))
    return digest.hexdigest()


class RunLog:
    """Rank 0's record of a run: progress lines to stdout and out/log.txt, numbers to out/metrics.jsonl. Both are
    appended over resumes; on resume, metrics entries past the checkpoint's step (written before a kill) are dropped,
    so metrics.jsonl reads as one run. On other ranks every call does nothing."""

    def __init__(self, out, is_main, resumed_step=None):
        self.is_main = is_main
        if not is_main:
            return
        self.log_path, self.metrics_path = Path(out) / "log.txt", Path(out) / "metrics.jsonl"
        if resumed_step is not None and self.metrics_path.exists():
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resumed_step]
            atomic_write(self.metrics_path, lambda file: file.write("".join(line + "\n" for line in kept).encode()))

    def line(self, text):
        if self.is_main:
            print(text, flush=True)
            with open(self.log_path, "a") as file:
                file.write(text + "\n")

    def metrics(self, entry):
        if self.is_main:
            with open(self.metrics_path, "a") as file:
                file.write(json.dumps(entry) + "\n")


def exit_with_error(error):
    """Bad input: the message alone on stderr (no traceback) and exit status 2."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def format_seconds(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs and MFU
# ---------------------------------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' datasheets; the first pattern found in the device name wins.
PEAK_TFLOPS_BF16 = (
    (r"H100 PCIe", 756.0), (r"H100 NVL", 835.0), (r"\bG?H(100|200)\b", 989.4),
    (r"A100", 312.0), (r"L40S", 362.1), (r"\bL4\b", 121.0), (r"RTX 4090", 165.2),
)


def peak_flops(device, peak_tflops=None):
    """Peak FLOP/s of one device: the flag if given, else the table for a known GPU, else None (no MFU)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, tflops in PEAK_TFLOPS_BF16:
            if re.search(pattern, name):
                return tflops * 1e12
    return None
