"""Machinery of train.py and sample.py: named configs, the one training loop (`fit`, for every job of ref/jobs.py),
distributed set-up, per-sample random draws, atomic checkpoints, the run log and the FLOP count behind MFU.

A config is one flat dict (`CONFIGS`); every field is also a command-line flag (`FIELDS` holds its type and help).
The randomness of a run is a function of its config alone: the data order is `ref.data.batch_indices(step)`, and
every random draw for a training sample (label dropout, t, the noise) comes from a generator seeded by the seed and the
sample's place in the data stream (`ref.data.stream_positions`). So a run resumed from a checkpoint continues exactly
as if it had never stopped, and the draws of a sample do not depend on the number of ranks.
"""
import argparse
import copy
import contextlib
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from torch.utils.flop_counter import FlopCounterMode

from ref.data import SHAPE_CLASSES, batch_indices, stream_positions
from ref.dit import count_parameters
from ref.ema import update_ema
from ref.jobs import make_job, read_run_checkpoint

# ---------------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------------


def optional_int(text):
    return None if text.lower() == "none" else int(text)


def optional_float(text):
    return None if text.lower() == "none" else float(text)


def optional_timestep_range(text):
    """"LOW,HIGH" -> [LOW, HIGH] (inclusive DDPM steps), "none" -> None."""
    if text.lower() == "none":
        return None
    low, high = (int(value) for value in text.split(","))
    return [low, high]


FIELDS = {  # name: (type, help); every field is a flag --name-with-dashes
    "job": (str, "what the run trains (ref/jobs.py): dit | unet | estimator | probe | controlnet"),
    "data": (str, "shapes (procedural, 3 x S x S pixels) | images (folder <class>/<image>) | latents (SD-VAE shards)"),
    "data_path": (str, "the image folder or the folder of latents_*.npy / labels_*.npy shards"),
    "image_size": (int, "image side in pixels (latents: the image they encode; the network sees image_size / 8)"),
    "num_classes": (int, "class labels 0..num_classes-1; label num_classes is the null label of CFG"),
    "shapes_items": (int, "shapes: epoch length (scenes are rendered from their index, so any length is free)"),
    "flip": (bool, "images: add mirrored copies (the dataset doubles)"),
    "depth": (int, "dit: transformer blocks; estimator: residual blocks per level"),
    "hidden_size": (int, "dit: token width; estimator: channels at full resolution; probe: projection width P"),
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
    "snapshot_every": (optional_int, "training IMAGES between kept copies of latest.pt, out/snapshot-<images "
                                     "seen>.pt, for FID-vs-training curves; none: no snapshots"),
    "log_every": (int, "steps between progress lines"),
    "workers": (int, "data-loading worker processes per rank (0: load in the training process)"),
    "bf16": (bool, "CUDA: bf16 autocast (TF32 matmuls are always on); ignored on the CPU"),
    "compile": (bool, "torch.compile the model (before the DDP wrap)"),
    "gradient_checkpointing": (bool, "recompute block activations in the backward pass to save memory"),
    "peak_tflops": (optional_float, "peak TFLOP/s of one device for MFU (default: the GPU's bf16 dense peak)"),
    "stop_after": (optional_int, "debug: checkpoint and stop after this step, as if killed there"),
    # the InnerControl pipeline (jobs unet, estimator, probe, controlnet)
    "unet": (str, "unet: the ref/unet.py preset of the base UNet (pixel space, 3 channels)"),
    "task": (str, "estimator, probe, controlnet: depth | segmentation | edges"),
    "tap_mode": (str, "probe: decoder features it reads, conv (ResBlocks) | attn (self-attention outputs)"),
    "base": (str, "probe, controlnet: the base UNet run's latest.pt (its EMA weights, frozen)"),
    "probe": (str, "controlnet: the probe run's latest.pt, for the alignment term (beta > 0)"),
    "reward_model": (str, "controlnet: the reward estimator run's latest.pt, for the reward term (alpha > 0)"),
    "init": (str, "controlnet: start from this controlnet run's weights (Eq. 8 after the plain fine-tune)"),
    "alpha": (optional_float, "controlnet: reward weight (none: the task's Table 4 value; 0: no reward term)"),
    "beta": (optional_float, "controlnet: alignment weight (none: the task's Table 4 value; 0: no alignment term)"),
    "reward_range": (optional_timestep_range, "controlnet: LOW,HIGH steps of the reward term (none: Table 4)"),
    "align_range": (optional_timestep_range, "controlnet: LOW,HIGH steps of the alignment term (none: Table 4)"),
}

# Fields that may change when a run is resumed: how far and how it runs, not what it computes.
RUN_FIELDS = {"config", "steps", "checkpoint_every", "snapshot_every", "log_every", "workers", "compile",
              "gradient_checkpointing", "peak_tflops", "stop_after"}
# Counts that must be positive (None allowed where the field is optional) and counts that may be zero.
POSITIVE_FIELDS = ("steps", "batch_size", "checkpoint_every", "snapshot_every", "log_every", "stop_after",
                   "shapes_items", "image_size", "num_classes", "depth", "hidden_size", "num_heads", "patch_size")
NON_NEGATIVE_FIELDS = ("workers",)

_RUN_DEFAULTS = dict(data_path=None, shapes_items=1_000_000, flip=False, objective="flow", beta_schedule="linear",
                     aux_weight=0.5, label_dropout=0.1, lr=1e-4, grad_clip=1.0, seed=0, workers=0, bf16=True,
                     compile=False, gradient_checkpointing=False, peak_tflops=None, stop_after=None,
                     snapshot_every=None)
_SHAPES = dict(_RUN_DEFAULTS, job="dit", data="shapes", image_size=32, num_classes=len(SHAPE_CLASSES))
# SiT / IG release settings (docs: IG notes): batch 256, lr 1e-4, EMA 0.9999, SD-VAE latents of 256 px ImageNet.
_IMAGENET = dict(_RUN_DEFAULTS, job="dit", data="latents", image_size=256, num_classes=1000, batch_size=256,
                 ema_decay=0.9999, checkpoint_every=10_000, log_every=100, workers=4)

CONFIGS = {
    # A few minutes on 2 CPU cores: a 4-block, 96-wide DiT on 4x4 patches of 32 px shapes, the IG head after block 1.
    # A higher lr and a shorter EMA than SiT's, for a run of a few hundred steps.
    "shapes-tiny": dict(_SHAPES, depth=4, hidden_size=96, num_heads=4, patch_size=4, intermediate_block=1,
                        batch_size=32, steps=300, lr=1e-3, ema_decay=0.98, checkpoint_every=100, log_every=25),
    # The IG-at-image-scale CPU run (README), about 30 minutes on 2 cores (2 ranks of 1 thread): 6 blocks of width
    # 192 (3 heads) on 4x4 patches, the IG head after block 2 of 6 (a third of the depth, as block 4 of 12 in
    # SiT-B/2); 224,000 images. Half DiT-S's width buys 5x the images of a DiT-S-wide run in the same time (at 650
    # steps that one drew no shapes yet); lr 1e-3, EMA 0.999 (a 1000-step window).
    "shapes-small": dict(_SHAPES, depth=6, hidden_size=192, num_heads=3, patch_size=4, intermediate_block=2,
                         batch_size=64, steps=3500, lr=1e-3, ema_decay=0.999, checkpoint_every=250, log_every=50),
    # SiT-B/2 + IG (head after block 4 of 12), the paper's ablation model, 400K iterations.
    "sit-b2-imagenet": dict(_IMAGENET, depth=12, hidden_size=768, num_heads=12, patch_size=2, intermediate_block=4,
                            steps=400_000),
    # SiT-XL/2 + IG (head after block 8 of 28); 400K iterations = 80 epochs of ImageNet at batch 256.
    "sit-xl2-imagenet": dict(_IMAGENET, depth=28, hidden_size=1152, num_heads=16, patch_size=2, intermediate_block=8,
                             steps=400_000),
}

# The InnerControl pipeline on 32 px shapes (README): pixel-space DDPM with SD1.5's scaled-linear betas (1000 steps;
# Table 4's timestep ranges are in its steps; its terminal sqrt(abar) of 0.07, against 0.006 for the linear betas,
# keeps the one-step x0 of an eps model usable at high t: with linear betas a 1000-step base sampled saturated
# colours), captions dropped with probability label_dropout for CFG. Each stage reads the runs before it from their
# default folders; "{task}" in a path is the run's task. Every stage of every task:
# `train.py --config NAME --task TASK`.
_PIPELINE = dict(_RUN_DEFAULTS, data="shapes", image_size=32, num_classes=len(SHAPE_CLASSES), objective="eps",
                 beta_schedule="scaled_linear",
                 unet="tiny", task="depth", tap_mode="conv", base="runs/shapes-unet/latest.pt",
                 probe="runs/shapes-probe-{task}/latest.pt",
                 reward_model="runs/shapes-estimator-reward-{task}/latest.pt", init=None, alpha=None, beta=None,
                 reward_range=None, align_range=None, checkpoint_every=250, log_every=50)
CONFIGS.update({
    # The sizes are the documented CPU run of experiments/innercontrol.py (36 min for depth on 2 cores, README): short
    # runs, so EMA windows of a fifth to a half of each run.
    # 1. the base text-to-image UNet (the tiny preset: 1.0M parameters)
    "shapes-unet": dict(_PIPELINE, job="unet", batch_size=64, steps=1000, lr=1e-3, ema_decay=0.995),
    # 2. control estimators: the reward model D (weaker: narrow, short) and the evaluation model (wider, longer)
    "shapes-estimator-reward": dict(_PIPELINE, job="estimator", hidden_size=16, depth=1, batch_size=32, steps=300,
                                    lr=1e-3, ema_decay=0.99),
    "shapes-estimator-eval": dict(_PIPELINE, job="estimator", hidden_size=32, depth=2, batch_size=32, steps=1000,
                                  lr=1e-3, ema_decay=0.995),
    # 3. the readout probe on the frozen base (Adam lr 1e-3 and batch 16 as Readout Guidance; P = 64 for the tiny UNet)
    "shapes-probe": dict(_PIPELINE, job="probe", hidden_size=64, batch_size=16, steps=1000, lr=1e-3, ema_decay=0.99),
    # 4. the ControlNet fine-tuned with the diffusion loss alone (lr 3e-4: 1e-4 of the paper is for batch 256 and
    #    thousands of steps)
    "shapes-controlnet": dict(_PIPELINE, job="controlnet", alpha=0.0, beta=0.0, batch_size=32, steps=500, lr=3e-4,
                              ema_decay=0.99),
    # 5. continued from step 4 with Eq. 8 (alpha, beta, ranges: Table 4 unless given)
    "shapes-innercontrol": dict(_PIPELINE, job="controlnet", init="runs/shapes-controlnet-{task}/latest.pt",
                                batch_size=32, steps=200, lr=3e-4, ema_decay=0.98),
})
PATH_FIELDS = ("base", "probe", "reward_model", "init")  # may name the run's task as {task}


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
    config = dict(CONFIGS[args.config], **overrides, config=args.config)
    for name in PATH_FIELDS:
        if config.get(name):
            config[name] = config[name].format(task=config["task"])
    return config


def default_out(config):
    """runs/<config>, or runs/<config>-<task> for a run of the InnerControl pipeline that has a task."""
    task = config.get("task") if config["job"] in ("estimator", "probe", "controlnet") else None
    return Path("runs") / (config["config"] + (f"-{task}" if task else ""))


def check_counts(config):
    """A count of POSITIVE_FIELDS below 1 or of NON_NEGATIVE_FIELDS below 0 raises ValueError naming its flag."""
    for names, low in ((POSITIVE_FIELDS, 1), (NON_NEGATIVE_FIELDS, 0)):
        for name in names:
            value = config.get(name)
            if value is not None and value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be {'positive' if low else 'zero or more'}, "
                                 f"got {value}")


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


def snapshot_path(out, step, config):
    """out/snapshot-<images seen>.pt when this step's image count, step x batch size, reaches a multiple of
    snapshot_every (every count in images, as EDM2: the snapshots of two runs are comparable at any batch size);
    else None. Nine digits, so the names sort in training order up to 10^9 images."""
    every, images = config["snapshot_every"], step * config["batch_size"]
    if every and images // every > (images - config["batch_size"]) // every:
        return Path(out) / f"snapshot-{images:09d}.pt"
    return None


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


def training_flops_per_image(config, dataset):
    """Model FLOPs of one training forward + backward pass per image, counted by torch.utils.flop_counter on the meta
    device (no memory, no compute; there attention takes the math path, whose matmuls are counted: the CPU flash kernel
    has no FLOP formula): the job's loss on one sample of `dataset`, frozen partners included. Without gradient
    checkpointing: its recomputation is not model FLOPs."""
    with torch.device("meta"):
        job = make_job(dict(config, gradient_checkpointing=False), load=False)
        net = job.build()
    inputs = job.draw(job.collate([dataset[0]]), SampleDraws([0]))
    with FlopCounterMode(display=False) as counter:
        job.loss(net, *(tensor.to("meta") for tensor in inputs)).sum().backward()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------------
# The training loop, one for every job
# ---------------------------------------------------------------------------------------------------------------------

def fit(config, out, world):
    """Train the config's job (ref/jobs.py) into `out`: AdamW (betas 0.9, 0.999, no weight decay), gradient clipping,
    EMA, bf16 autocast on CUDA, DDP over the ranks, optional torch.compile; resume from out/latest.pt; progress,
    log.txt, metrics.jsonl and the numbered snapshots on rank 0 (latest.pt is rewritten with each snapshot). Bad
    input: a message and exit status 2, nothing written."""
    checkpoint_path = out / "latest.pt"
    try:  # bad input stops here, before anything is written
        check_counts(config)
        job = make_job(config)
        dataset = job.make_dataset()
        stream_positions(0, config["batch_size"], world.rank, world.world_size)  # checks the batch splits over ranks
        checkpoint = read_run_checkpoint(checkpoint_path) if checkpoint_path.exists() else None
        if checkpoint is not None:
            check_resumable(checkpoint["args"], config, checkpoint_path)
        torch.manual_seed(config["seed"])  # the initial weights
        model = job.build().to(world.device)
        job.to(world.device)
        flops_per_image = training_flops_per_image(config, dataset)  # reads one sample: a bad first file stops here
    except ValueError as error:
        exit_with_error(error)

    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], betas=(0.9, 0.999), weight_decay=0)
    start = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["opt"])
        start = checkpoint["step"]
    stop = min(config["steps"], config["stop_after"] or config["steps"])
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, world.is_main, resumed_step=start if checkpoint else None)
    peak = peak_flops(world.device, config["peak_tflops"])
    log.line(f"{'resumed at step ' + str(start) if checkpoint else 'new run'} in {out}: {config['job']} job, "
             f"{world.world_size} rank(s) on {world.device.type}, {count_parameters(model):,} trained parameters, "
             f"{flops_per_image / 1e9:.3f} GFLOP per image (forward + backward)\nconfig {json.dumps(config)}")

    net = torch.compile(model) if config["compile"] else model  # compile before the DDP wrap (nanoGPT)
    if world.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    loader = DataLoader(dataset, batch_sampler=StepBatches(start, stop, config["batch_size"], world.rank,
                                                           world.world_size, config["seed"], len(dataset)),
                        collate_fn=job.collate, num_workers=config["workers"], pin_memory=world.device.type == "cuda")
    run_start = interval_start = time.perf_counter()
    loss_sum, interval_steps = torch.zeros((), device=world.device), 0
    batches = iter(loader)
    for step in range(start, stop):
        try:
            batch = next(batches)  # a tuple of CPU tensors, the job's collate
        except ValueError as error:  # an image file that cannot be decoded
            exit_with_error(error)
        positions = stream_positions(step, config["batch_size"], world.rank, world.world_size)
        draws = SampleDraws(stream_seed(config["seed"], position) for position in positions)
        inputs = [tensor.to(world.device, non_blocking=True) for tensor in job.draw(batch, draws)]
        with autocast(world.device, config["bf16"]):
            loss = job.loss(net, *inputs).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks: the gradient of the global batch mean
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        optimizer.step()
        update_ema(ema, model, config["ema_decay"])
        loss_sum += loss.detach()
        interval_steps += 1
        done = step + 1

        if done % config["log_every"] == 0 or done == stop:
            mean_loss = all_reduce_mean(loss_sum / interval_steps).item()
            now = time.perf_counter()
            images_per_second = interval_steps * config["batch_size"] / (now - interval_start)
            mfu = flops_per_image * images_per_second / (peak * world.world_size) if peak else None
            eta = (now - run_start) / (done - start) * (stop - done)
            log.line(f"step {done}/{config['steps']}  loss {mean_loss:.4f}  {images_per_second:.1f} img/s  "
                     f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}  elapsed "
                     f"{format_seconds(now - run_start)}  ETA {format_seconds(eta)}")
            log.metrics(dict(step=done, images=done * config["batch_size"], loss=mean_loss,
                             grad_norm=grad_norm.item(), images_per_second=images_per_second, mfu=mfu,
                             seconds=now - run_start))
            loss_sum.zero_()
            interval_start, interval_steps = time.perf_counter(), 0
        snapshot = snapshot_path(out, done, config)
        if world.is_main and snapshot:  # before latest.pt: a kill between the two makes the resumed run rewrite it
            save_checkpoint(snapshot, model, ema, optimizer, done, config)
        if world.is_main and (done % config["checkpoint_every"] == 0 or done == stop or snapshot):
            save_checkpoint(checkpoint_path, model, ema, optimizer, done, config)

    if start >= stop:
        log.line(f"nothing to train: {checkpoint_path} is at step {start}")
    elif stop < config["steps"]:
        log.line(f"stopped after step {stop} of {config['steps']} (--stop-after); rerun without it to continue")
    # Equal digests on every rank show the replicas stayed bitwise in step.
    print(f"rank {world.rank}: weights sha256 {weights_digest(model.state_dict())}", flush=True)
