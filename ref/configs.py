"""Configs of train.py: each run is one flat dict of its kind's fields, every field a command-line flag (a run's
`fields` holds each one's type and help). Named presets: `CONFIGS` here (SiT + IG and LightningDiT + IG on ImageNet
latents) and the testbed's in shapes/runs.py; a resumed run refuses settings that would change what it computes
(`check_resumable`). A stored config written before a field existed reads as that field's old default
(`complete_stored_config`).
"""
import argparse
from pathlib import Path

from ref.arguments import check_arguments


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


# The fields of every run: how long, how fast, how it is checkpointed. Each kind of run adds its own (DiTRun.fields in
# ref/internal_guidance.py, the testbed's runs in shapes/runs.py); name: (type, help), every field a flag --name.
TRAINING_FIELDS = {
    "batch_size": (int, "global batch size, all ranks together"),
    "steps": (int, "training steps of the whole run"),
    "lr": (float, "AdamW learning rate (beta1 0.9; constant, as in both papers, unless --lr-decay-steps)"),
    "weight_decay": (float, "AdamW weight decay (0; the SD1.5 ControlNet runs 1e-2, the InnerControl release's)"),
    "lr_decay_steps": (int, "the run's last N steps lower the lr linearly towards 0 (the decay of a "
                            "warmup-stable-decay schedule; 0: constant); raising --steps and setting it on resume "
                            "cools a finished run down"),
    "adam_beta2": (float, "AdamW beta2 (0.999; LightningDiT 0.95)"),
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
    "peak_tflops": (optional_float, "peak TFLOP/s of one device for MFU (default: the GPU's bf16 dense peak)"),
    "stop_after": (optional_int, "debug: checkpoint and stop after this step, as if killed there"),
}

# Fields that may change when a run is resumed: how far and how it runs, not what it computes; and where the lr's
# final decay begins (steps, lr_decay_steps): a run resumed before that point computes what one run with the new
# values does.
RUN_FIELDS = {"config", "steps", "lr_decay_steps", "checkpoint_every", "snapshot_every", "log_every", "workers",
              "compile", "gradient_checkpointing", "peak_tflops", "stop_after", "grad_accumulation"}
# Counts that must be positive (None allowed where the field is optional) and counts that may be zero.
POSITIVE_FIELDS = ("steps", "batch_size", "checkpoint_every", "snapshot_every", "log_every", "stop_after",
                   "shapes_items", "image_size", "num_classes", "depth", "hidden_size", "num_heads", "patch_size",
                   "grad_accumulation")
NON_NEGATIVE_FIELDS = ("workers", "lr_decay_steps")

# Fields added after runs were stored, each with the value a stored config without it was trained with: of every run,
# and of the DiT / SiT runs besides.
ADDED_FIELDS = dict(adam_beta2=0.999, lr_decay_steps=0, weight_decay=0.0)
ADDED_DIT_FIELDS = dict(arch="dit", vae="sd", cosine_loss=False, ig_omega=0.0, t_distribution="uniform",
                        t_location=0.0)

RUN_DEFAULTS = dict(ADDED_FIELDS, lr=1e-4, grad_clip=1.0, seed=0, workers=0, bf16=True, compile=False,
                    peak_tflops=None, stop_after=None, snapshot_every=None)
# The DiT / SiT runs' defaults besides (a preset of another kind leaves out what its kind does not declare).
DIT_DEFAULTS = dict(RUN_DEFAULTS, **ADDED_DIT_FIELDS, job="dit", data_path=None, flip=False, objective="flow",
                    beta_schedule="linear", aux_weight=0.5, label_dropout=0.1, gradient_checkpointing=False)
# SiT / IG release settings (docs: IG notes): batch 256, lr 1e-4, EMA 0.9999, SD-VAE latents of 256 px ImageNet.
_IMAGENET = dict(DIT_DEFAULTS, data="latents", image_size=256, num_classes=1000, batch_size=256,
                 ema_decay=0.9999, checkpoint_every=10_000, log_every=100, workers=4)

CONFIGS = {
    # SiT-B/2 + IG (head after block 4 of 12), the paper's ablation model, 400K iterations.
    "sit-b2-imagenet": dict(_IMAGENET, depth=12, hidden_size=768, num_heads=12, patch_size=2, intermediate_block=4,
                            steps=400_000),
    # SiT-XL/2 + IG (head after block 8 of 28); 400K iterations = 80 epochs of ImageNet at batch 256.
    "sit-xl2-imagenet": dict(_IMAGENET, depth=28, hidden_size=1152, num_heads=16, patch_size=2, intermediate_block=8,
                             steps=400_000),
    # LightningDiT-XL/1 + IG (head after block 8 of 28) on VA-VAE f16d32 latents (32 x 16 x 16, normalised by their
    # statistics), the IG release's LightningDiT/configs/lightningdit_xl_vavae_f16d32.yaml: lr 2e-4, beta2 0.95, the
    # cosine velocity term, max_steps 3M; EMA 0.9999, label dropout 0.1, grad clip 1 and batch 256 as SiT. (The release
    # trains it with Muon on the weight matrices and AdamW on the gains and biases; here AdamW trains all.)
    "lightningdit-xl1-imagenet": dict(_IMAGENET, arch="lightningdit", vae="vavae-f16d32", depth=28, hidden_size=1152,
                                      num_heads=16, patch_size=1, intermediate_block=8, lr=2e-4, adam_beta2=0.95,
                                      cosine_loss=True, steps=3_000_000),
}


def add_config_flags(parser, fields):
    """One flag per field; a flag left out keeps the named config's value."""
    for name, (kind, help_text) in fields.items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:  # --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def resolve_config(args, preset, fields):
    """The named config `preset` cut to its kind's `fields`, with the flags given on the command line laid over it
    (a flag left out is no attribute), and its `job` and `config` name."""
    missing = sorted(set(fields) - set(preset))
    if missing:
        raise ValueError(f"config {args.config} gives no value for {', '.join(missing)}")
    config = {name: getattr(args, name, preset[name]) for name in fields}
    config.update(job=preset["job"], config=args.config)
    if "task" in config:  # a path may name the run's task as {task}
        config.update({name: value.replace("{task}", config["task"]) for name, value in config.items()
                       if isinstance(value, str)})
    return config


def default_out(config):
    """runs/<config>, or runs/<config>-<task> for a run of the InnerControl pipeline that has a task."""
    task_jobs = ("estimator", "probe", "controlnet", "sd-probe", "sd-controlnet")
    task = config.get("task") if config["job"] in task_jobs else None
    return Path("runs") / (config["config"] + (f"-{task}" if task else ""))


def check_values(config):
    """A count of POSITIVE_FIELDS below 1 or of NON_NEGATIVE_FIELDS below 0, a number that is not finite (--lr nan) or
    a seed outside numpy's 0 .. 2**32 - 1 raises ValueError naming its flag."""
    check_arguments(config, counts=POSITIVE_FIELDS, non_negative=NON_NEGATIVE_FIELDS,
                    finite=[name for name, value in config.items() if isinstance(value, float)], seeds=("seed",))


def complete_stored_config(stored):
    """A config read from a checkpoint, with the old default of each field added since (`ADDED_FIELDS`) it lacks."""
    added = dict(ADDED_FIELDS, **(ADDED_DIT_FIELDS if stored.get("job") == "dit" else {}))
    return dict(added, **stored)


def check_resumable(stored, config, path):
    """Refuse to continue a run whose stored config differs from this one in any of this run's fields but RUN_FIELDS
    (a field the stored config has and this kind of run no longer declares is not read)."""
    differences = [f"{name}: stored {stored.get(name)!r}, given {config[name]!r}" for name in sorted(config)
                   if name not in RUN_FIELDS and stored.get(name) != config[name]]
    if differences:
        raise ValueError(f"{path} is a checkpoint of a different run; to resume it, give the stored settings (or "
                         f"choose another --out): " + "; ".join(differences))


