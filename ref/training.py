"""Machinery of train.py and sample.py: named configs, model and data from a config, distributed set-up, per-sample
random draws, atomic checkpoints, the run log and the FLOP count behind MFU.

A config is one flat dict (`CONFIGS`); every field is also a command-line flag (`FIELDS` holds its type and help).
The randomness of a run is a function of its config alone: the data order is `ref.data.batch_indices(step)`, and
every random draw for a training sample (label dropout, t, the noise) comes from a generator seeded by the seed and the
sample's place in the data stream (`ref.data.stream_positions`). So a run resumed from a checkpoint continues exactly
as if it had never stopped, and the draws of a sample do not depend on the number of ranks.
"""
import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler
from torch.utils.flop_counter import FlopCounterMode

from ref.data import SHAPE_CLASSES, ImageFolder, LatentShards, Shapes, batch_indices
from ref.checkpoints import read_checkpoint
from ref.dit import DiT

# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def optional_int(text):
    return None if text.lower() == "none" else int(text)


def optional_float(text):
    return None if text.lower() == "none" else float(text)


FIELDS = {  # name: (type, help); every field is a flag --name-with-dashes
    "data": (str, "shapes (procedural, 3 x S x S pixels) | images (folder <class>/<image>) | latents (SD-VAE shards)"),
    "data_path": (str, "the image folder or the folder of latents_*.npy / labels_*.npy shards"),
    "image_size": (int, "image side in pixels (latents: the image they encode; the network sees image_size / 8)"),
    "num_classes": (int, "class labels 0..num_classes-1; label num_classes is the null label of CFG"),
    "shapes_items": (int, "shapes: epoch length (scenes are rendered from their index, so any length is free)"),
    "flip": (bool, "images: add mirrored copies (the dataset doubles)"),
    "depth": (int, "transformer blocks"),
    "hidden_size": (int, "token width"),
    "num_heads": (int, "attention heads"),
    "patch_size": (int, "patch side in network-input pixels"),
    "intermediate_block": (optional_int, "IG head after this block (1-indexed); none for a plain DiT / SiT"),
    "objective": (str, "flow (SiT / IG: velocity eps - x0, t ~ U(0, 1)) | eps (DiT: DDPM noise, t ~ U{0..T-1})"),
    "beta_schedule": (str, "eps objective: DDPM betas (linear, scaled_linear, cosine), 1000 steps"),
    "aux_weight": (float, "lambda of the IG auxiliary loss ||D_i - target||^2"),
    "label_dropout": (float, "probability of replacing a label by the null label (CFG training)"),
    "batch_size": (int, "global batch size, all ranks together"),
    "steps": (int, "training steps of the whole run"),
    "lr": (float, "AdamW learning rate (betas 0.9, 0.999, weight decay 0, constant)"),
    "grad_clip": (float, "clip the global gradient norm to this"),
    "ema_decay": (float, "EMA decay per step"),
    "seed": (int, "seed of the initial weights, the data order and every training draw"),
    "checkpoint_every": (int, "steps between checkpoints (out/latest.pt); one is also written at the end"),
    "log_every": (int, "steps between progress lines"),
    "workers": (int, "data-loading worker processes per rank (0: load in the training process)"),
    "bf16": (bool, "CUDA: bf16 autocast (TF32 matmuls are always on); ignored on the CPU"),
    "compile": (bool, "torch.compile the model (before the DDP wrap)"),
    "gradient_checkpointing": (bool, "recompute block activations in the backward pass to save memory"),
    "peak_tflops": (optional_float, "peak TFLOP/s of one device for MFU (default: the GPU's bf16 dense peak)"),
    "stop_after": (optional_int, "debug: checkpoint and stop after this step, as if killed there"),
}

# Fields that may change when a run is resumed: how far and how it runs, not what it computes.
RUN_FIELDS = {"config", "steps", "checkpoint_every", "log_every", "workers", "compile", "gradient_checkpointing",
              "peak_tflops", "stop_after"}

_RUN_DEFAULTS = dict(data_path=None, shapes_items=1_000_000, flip=False, objective="flow", beta_schedule="linear",
                     aux_weight=0.5, label_dropout=0.1, lr=1e-4, grad_clip=1.0, seed=0, workers=0, bf16=True,
                     compile=False, gradient_checkpointing=False, peak_tflops=None, stop_after=None)
_SHAPES = dict(_RUN_DEFAULTS, data="shapes", image_size=32, num_classes=len(SHAPE_CLASSES))
# SiT / IG release settings (docs: IG notes): batch 256, lr 1e-4, EMA 0.9999, SD-VAE latents of 256 px ImageNet.
_IMAGENET = dict(_RUN_DEFAULTS, data="latents", image_size=256, num_classes=1000, batch_size=256, ema_decay=0.9999,
                 checkpoint_every=10_000, log_every=100, workers=4)

CONFIGS = {
    # A few minutes on 2 CPU cores: a 4-block, 96-wide DiT on 4x4 patches of 32 px shapes, the IG head after block 1.
    # A higher lr and a shorter EMA than SiT's, for a run of a few hundred steps.
    "shapes-tiny": dict(_SHAPES, depth=4, hidden_size=96, num_heads=4, patch_size=4, intermediate_block=1,
                        batch_size=32, steps=300, lr=1e-3, ema_decay=0.98, checkpoint_every=100, log_every=25),
    # The IG-at-image-scale CPU run (README), about 25 minutes on 2 cores (2 ranks of 1 thread): DiT-S width (384,
    # 6 heads) at 6 blocks on 4x4 patches, the IG head after block 2 of 6 (a third of the depth, as block 4 of 12 in
    # SiT-B/2); 41,600 images. lr 6e-4 beat 3e-4 over the first 120 steps; EMA 0.995 (a 200-step window).
    "shapes-small": dict(_SHAPES, depth=6, hidden_size=384, num_heads=6, patch_size=4, intermediate_block=2,
                         batch_size=64, steps=650, lr=6e-4, ema_decay=0.995, checkpoint_every=100, log_every=25),
    # SiT-B/2 + IG (head after block 4 of 12), the paper's ablation model, 400K iterations.
    "sit-b2-imagenet": dict(_IMAGENET, depth=12, hidden_size=768, num_heads=12, patch_size=2, intermediate_block=4,
                            steps=400_000),
    # SiT-XL/2 + IG (head after block 8 of 28); 400K iterations = 80 epochs of ImageNet at batch 256.
    "sit-xl2-imagenet": dict(_IMAGENET, depth=28, hidden_size=1152, num_heads=16, patch_size=2, intermediate_block=8,
                             steps=400_000),
}


def add_config_flags(parser):
    """--config NAME and one flag per field; a flag left out keeps the named config's value."""
    parser.add_argument("--config", required=True, choices=list(CONFIGS), help="named config (ref/training.py)")
    for name, (kind, help_text) in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:  # --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def resolve_config(args):
    """The named config with the flags given on the command line laid over it (a flag left out is no attribute)."""
    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    return dict(CONFIGS[args.config], **overrides, config=args.config)


def check_resumable(stored, config, path):
    """Refuse to continue a run whose stored config differs from this one in anything but RUN_FIELDS."""
    differences = [f"{name}: stored {stored.get(name)!r}, given {config.get(name)!r}"
                   for name in sorted(set(stored) | set(config))
                   if name not in RUN_FIELDS and stored.get(name) != config.get(name)]
    if differences:
        raise ValueError(f"{path} is a checkpoint of a different run; to resume it, give the stored settings (or "
                         f"choose another --out):\n  " + "\n  ".join(differences))


# ---------------------------------------------------------------------------------------------------------------------
# Model and data from a config
# ---------------------------------------------------------------------------------------------------------------------

LATENT_CHANNELS, LATENT_DOWNSAMPLING = 4, 8  # SD-VAE: 256 px image -> (4, 32, 32) latent


def network_input_shape(config):
    """(C, H, W) of what the network sees: RGB pixels in [-1, 1], or scaled SD-VAE latents at 1/8 of the image side."""
    if config["data"] == "latents":
        side = config["image_size"] // LATENT_DOWNSAMPLING
        return LATENT_CHANNELS, side, side
    return 3, config["image_size"], config["image_size"]


def build_model(config):
    """The DiT / SiT of a config (learned sigma off: both objectives regress one prediction)."""
    channels, side, _ = network_input_shape(config)
    return DiT(input_size=side, patch_size=config["patch_size"], in_channels=channels,
               hidden_size=config["hidden_size"], depth=config["depth"], num_heads=config["num_heads"],
               num_classes=config["num_classes"], class_dropout_prob=config["label_dropout"],
               intermediate_block=config["intermediate_block"],
               gradient_checkpointing=config["gradient_checkpointing"])


def make_dataset(config):
    """The training data of a config; bad input (missing, empty or malformed folders and shards, more classes than
    the config has) raises ValueError naming the file or setting."""
    if config["data"] == "shapes":
        dataset, classes = Shapes(config["image_size"], num_items=config["shapes_items"]), len(SHAPE_CLASSES)
    elif config["data"] in ("images", "latents"):
        if not config["data_path"]:
            raise ValueError(f"--data {config['data']} needs --data-path")
        if config["data"] == "images":
            dataset = ImageFolder(config["data_path"], config["image_size"], flip=config["flip"])
            classes = len(dataset.classes)
        else:
            dataset = LatentShards(config["data_path"], network_input_shape(config))
            classes = int(dataset.labels.max()) + 1
    else:
        raise ValueError(f"unknown data {config['data']!r}; choose shapes, images or latents")
    if classes > config["num_classes"]:
        raise ValueError(f"the data has {classes} classes but the config {config['num_classes']}; set --num-classes")
    return dataset


class StepBatches(Sampler):
    """This rank's dataset indices for steps [start, stop), one list per step (ref.data.batch_indices)."""

    def __init__(self, start, stop, batch_size, rank, world_size, seed, num_items):
        self.steps = range(start, stop)
        self.batch_args = batch_size, rank, world_size, seed, num_items

    def __len__(self):
        return len(self.steps)

    def __iter__(self):
        for step in self.steps:
            yield batch_indices(step, *self.batch_args).tolist()


def collate_inputs_labels(samples):
    """Every dataset puts (input, label) first -> x (N, C, H, W), y (N,) long."""
    return torch.stack([sample[0] for sample in samples]), torch.tensor([sample[1] for sample in samples])


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
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    try:
        yield Distributed(rank, world_size, device)
        if launched:  # no rank tears its group down while another still works (gloo aborts the early one)
            dist.barrier()
    finally:
        if launched:
            dist.destroy_process_group()


def all_reduce_mean(value):
    """Mean over the ranks of a scalar tensor (itself in one process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def gather_to_main(obj):
    """Every rank's `obj` as a list on rank 0 (rank order), None elsewhere; [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
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
    """{model, ema, opt, step, args} as DiT / SiT store them; args is the config (a plain dict)."""
    checkpoint = dict(model=model.state_dict(), ema=ema.state_dict(), opt=optimizer.state_dict(), step=step,
                      args=config)
    atomic_write(path, lambda file: torch.save(checkpoint, file))


def read_checkpoint_file(path):
    """ref.dit.read_checkpoint, with every failure to read the file as a ValueError naming it."""
    try:
        return read_checkpoint(path)
    except Exception as error:  # unpickling fails in many ways; each means "not a checkpoint we can read"
        raise ValueError(f"cannot read checkpoint {path}: {error}") from None


def read_run_checkpoint(path):
    """A checkpoint written by train.py (a dict with its config under "args"); anything else raises ValueError."""
    checkpoint = read_checkpoint_file(path)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), dict)
            and "depth" in checkpoint["args"]):
        raise ValueError(f"{path} is not a checkpoint written by train.py (no config under 'args')")
    return checkpoint


def weights_digest(state_dict):
    """sha256 of every tensor's bytes in key order: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
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


def training_flops_per_image(config):
    """Model FLOPs of one forward + backward pass per image, counted by torch.utils.flop_counter on the meta device
    (no memory, no compute; there attention takes the math path, whose matmuls are counted: the CPU flash kernel has
    no FLOP formula). Without gradient checkpointing: its recomputation is not model FLOPs."""
    with torch.device("meta"):
        model = build_model(dict(config, gradient_checkpointing=False))
        x = torch.zeros(1, *network_input_shape(config))
        t, y = torch.zeros(1), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        final, intermediate = model(x, t, y)
        (final.sum() + (0 if intermediate is None else intermediate.sum())).backward()
    return counter.get_total_flops()
