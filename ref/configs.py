"""Configs of train.py: each run is one flat dict of fields, every field a command-line flag (`FIELDS` holds its type
and help). Named presets: `CONFIGS` here (SiT + IG on ImageNet latents) and the testbed's in shapes/runs.py; a
resumed run refuses settings that would change what it computes (`check_resumable`).
"""
import argparse
from pathlib import Path


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
    "job": (str, "what the run trains (shapes/runs.py): dit | unet | estimator | probe | controlnet"),
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

RUN_DEFAULTS = dict(data_path=None, shapes_items=1_000_000, flip=False, objective="flow", beta_schedule="linear",
                    aux_weight=0.5, label_dropout=0.1, lr=1e-4, grad_clip=1.0, seed=0, workers=0, bf16=True,
                    compile=False, gradient_checkpointing=False, peak_tflops=None, stop_after=None,
                    snapshot_every=None)
# SiT / IG release settings (docs: IG notes): batch 256, lr 1e-4, EMA 0.9999, SD-VAE latents of 256 px ImageNet.
_IMAGENET = dict(RUN_DEFAULTS, job="dit", data="latents", image_size=256, num_classes=1000, batch_size=256,
                 ema_decay=0.9999, checkpoint_every=10_000, log_every=100, workers=4)

CONFIGS = {
    # SiT-B/2 + IG (head after block 4 of 12), the paper's ablation model, 400K iterations.
    "sit-b2-imagenet": dict(_IMAGENET, depth=12, hidden_size=768, num_heads=12, patch_size=2, intermediate_block=4,
                            steps=400_000),
    # SiT-XL/2 + IG (head after block 8 of 28); 400K iterations = 80 epochs of ImageNet at batch 256.
    "sit-xl2-imagenet": dict(_IMAGENET, depth=28, hidden_size=1152, num_heads=16, patch_size=2, intermediate_block=8,
                             steps=400_000),
}

PATH_FIELDS = ("base", "probe", "reward_model", "init")  # may name the run's task as {task}


def add_config_flags(parser, configs):
    """--config NAME (one of `configs`) and one flag per field; a flag left out keeps the named config's value."""
    parser.add_argument("--config", required=True, choices=list(configs), help="named config (ref/configs.py, "
                        "shapes/runs.py)")
    for name, (kind, help_text) in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:  # --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def resolve_config(args, configs):
    """The named config with the flags given on the command line laid over it (a flag left out is no attribute)."""
    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    config = dict(configs[args.config], **overrides, config=args.config)
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


