"""Sample a trained DiT / SiT / LightningDiT with Internal Guidance and / or CFG, each on its own interval of t, and
decode a latent model's samples with its VAE; or a ControlNet run.

    python sample.py runs/shapes-tiny [--num-samples 64] [--seed 0] [--batch-size 32] [--sampler em|heun|ddpm|ddim]
                     [--steps N] [--ig W] [--ig-interval LO HI] [--cfg S] [--cfg-interval LO HI] [--out DIR]
                     [--labels balanced|random] [--png]
    python sample.py SiT-XL-2-IG.pt --checkpoint-kind ig-sit --model SiT-XL/2 --ig 1.4 --cfg 1.35 --cfg-interval 0 0.7 \
                     --labels random --vae sd-vae-ft-ema --num-samples 50000 --bf16            # then eval.py fid
    python sample.py LightningDiT-XL-1-IG.pt --checkpoint-kind ig-lightningdit --model LightningDiT-XL/1 \
                     --ig 1.4 --cfg 1.45 --cfg-interval 0 0.81 --labels random --vae vavae-f16d32.pt \
                     --latent-stats latents_stats.pt --num-samples 50000 --bf16               # Heun, 124 steps
    python sample.py DiT-XL-2-256x256.pt --checkpoint-kind dit --model DiT-XL/2 --cfg 1.5      # DDPM, 250 steps
    python sample.py SiT-XL-2-256x256.pt --checkpoint-kind sit --model SiT-XL/2 --cfg 1.5      # Euler-Maruyama, 250
    python sample.py runs/shapes-innercontrol-depth --num-samples 200 --seeds-per-control 2 --cfg 3 --steps 20
    torchrun --nproc_per_node=N sample.py ...

RUN is a run folder (its latest.pt) or a checkpoint of train.py; its EMA weights are used (--weights model: the raw
ones). --checkpoint-kind says what else it may be, with --model PRESET for its size (--image-size, --num-classes):
  own     a train.py run (the default): objective, head and schedule from its config.
  dit     facebookresearch/DiT: eps prediction with learned sigma (2C output channels). Its own protocol: DDPM
          ancestral sampling respaced to 250 steps (space_timesteps) with the learned variance of the extra channels,
          CFG on the first 3 latent channels with the rest (the 4th and the variance) from the conditional branch,
          as its forward_with_cfg; --sampler ddim also fits. No IG head.
  sit     willisma/SiT: velocity with learned sigma, time the other way (t = 0 noise, velocity x0 - eps), turned into
          this repository's convention (ref.dit.reversed_time); Euler-Maruyama (its sample.py SDE: 250 steps, last
          step Mean 0.04, diffusion form "sigma", which is g(t)^2 = 2t here) or Heun; CFG on 3 channels as its
          forward_with_cfg. No IG head.
  ig-sit  the IG release (CVL-UESTC/Internal-Guidance): velocity, t = 1 noise as here, the IG head `final_layer_xr`
          after block 8 or its training args' encoder_depth (a different --intermediate-block is refused); CFG on
          every channel, as its samplers.py.
  ig-lightningdit  the IG release's LightningDiT (LightningDiT/, --model LightningDiT-XL/1): VA-VAE f16d32 latents
          (32 channels, 16 x 16 at 256 px) normalised per channel (--latent-stats, its latents_stats.pt); the head
          `final_layer_xr` after its config's encoder_depth (8); time the other way, turned inside ref.lightningdit.
          Its sampler (inference.py, transport/): Heun ODE (torchdiffeq "heun2": a Heun step on every interval, the
          last included) on 125 grid points = 124 steps, 248 network evaluations (--steps 124, the default here),
          timestep shift 0.3 (ref.samplers.shifted_grid); IG 1.4 everywhere; CFG 1.45 on every channel (its
          forward_with_cfg guides all in_channels) "from t = 0.19" in its time (t = 0 noise), i.e. where
          t_release >= 0.19: --cfg-interval 0 0.81 here; without CFG it uses IG 1.7. Its reported FIDs use random
          labels (--labels random): 1.19 with CFG, 1.34 without (50K samples).
Flow models (t = 1 noise -> 0 data): Euler-Maruyama, the IG default (250 steps on the grid 1 -> 0.04, then a mean step
to 0; --diffusion sbdm: SiT's "SBDM" coefficient instead of g(t)^2 = 2t), or Heun on a uniform grid (--timestep-shift:
LightningDiT's shifted one) with an Euler last step (ig-lightningdit: a Heun step, as its release). Eps models:
DDPM ancestral (respaced to --steps as ADM / DiT do; own runs: every one of the T steps by default) or DDIM. Guidance
goes through ref.guidance.guided_denoiser; intervals are in t in [0, 1] (t = 1 noise; for eps models t = timestep /
1000); a step outside the CFG interval runs the conditional branch only, and settings.json reports the network
evaluations counted per sample.
Sample i has label i mod num_classes (--labels balanced, the default), a label drawn from numpy's generator seeded
with seed + i (--labels random, as the IG release's "random sampling" FIDs) or --class-label, and its own generator,
seeded with seed + i, for its initial noise and every step's noise: the samples do not depend on the batch size or
the number of ranks (up to float32 rounding: CPU matmul kernels round differently for different row counts, ~1e-7,
which can move a rare pixel by one level; on this machine the tests' 7 samples came out bitwise equal). Rank r takes
samples r, r + W, r + 2W, ...; rank 0 gathers them and writes OUT/samples.npz (ADM: arr_0 uint8 N x H x W x 3,
arr_1 labels), OUT/grid.png and OUT/settings.json, with --png also OUT/images/000000.png, ... (sample order).
Latent models: with --vae PATH (ref.latents.read_vae; --vae-kind, default: an own run's config `vae`, sd for dit / sit /
ig-sit, vavae-f16d32 for ig-lightningdit) each batch is decoded on the sampling device (under bf16 autocast with
--bf16 on CUDA) into the images above: the latents divided by the VAE's scaling factor (sd: 0.18215), or for a model
of per-channel normalised latents (LightningDiT, an own run on vavae-f16d32) denormalised first with --latent-stats
(z * std + mean, ref.latents.denormalise_latents; an own run's default: <its data_path>/latents_stats.pt). Without
--vae they are written as OUT/latents.npy (N, C, h, w), the VAE's own latents ready for its decoder, and
OUT/labels.npy. A VAE file of another kind, a missing statistics file or one of another channel count is refused
before sampling.

A controlnet run of the InnerControl pipeline (train.py --config shapes-controlnet / shapes-innercontrol) samples
its base UNet steered by the ControlNet: DDIM (50 steps by default) with CFG on the caption (--cfg, the control in both
branches). Sample i follows the control and caption of evaluation scene i // --seeds-per-control (Shapes seed
shapes.evaluation.EVAL_SCENE_SEED) from noise seeded with seed + i; arr_1 holds the scene indices, grid.png shows each
control beside its samples; `eval.py innercontrol` scores them.
Bad input: a message and exit status 2, nothing written; a foreign checkpoint that does not fit is named in one line
with the kind its keys belong to.
"""
import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ref import runtime, text_to_image
from ref.checkpoints import misfit_line, read_checkpoint, unwrap_state
from ref.data import to_uint8
from ref.dit import (DiT, IG_RELEASE_HEAD_BLOCK, MODELS, canonical_key, ig_release_head_block, load_checkpoint,
                     reversed_time)
from ref.guidance import guided_denoiser
from ref.internal_guidance import dit_from_config
from ref.latents import (RECIPES, STATS_FILE, denormalise_latents, on_meta, read_latent_stats, read_vae,
                         shard_settings)
from ref.lightningdit import MODELS as LIGHTNINGDIT_MODELS
from ref.lightningdit import LightningDiT
from ref.sample_outputs import gather_in_order, write_outputs, write_pngs
from ref.samplers import (DIFFUSIONS, SBDM_T_MAX, ddim, ddpm_ancestral, euler_maruyama, heun, respaced_timesteps,
                          shifted_grid, spaced_timesteps, uniform_grid)
from ref.vae import MODELS as VAE_MODELS
from ref.schedules import DDPMSchedule
from ref.tokenizer import CLIPTokenizer
from shapes import pipeline, runs
from shapes.data import Shapes
from shapes.evaluation import EVAL_SCENE_SEED, generate

SAMPLERS = {"flow": ("em", "heun"), "eps": ("ddpm", "ddim")}  # the first is the default
DEFAULT_STEPS = {"em": 250, "heun": 50, "ddim": 50}  # ddpm: every step of an own run, DiT's 250 for dit
# What a foreign checkpoint is (see the module docstring): the network family (its --model presets), the objective it
# predicts, whether it has the learned-sigma channels, whether it runs time the other way (LightningDiT turns its time
# inside its forward), the channels its own CFG guides (None: all), whether it can have the IG head, the VAE whose
# latents it models, and its own sampler when it is not the objective's first (with its step count, timestep shift and
# last Heun step) or its DDPM step count.
CHECKPOINT_KINDS = {
    "dit": dict(arch="dit", objective="eps", learn_sigma=True, reversed_time=False, cfg_channels=3, ig_head=False,
                latents_of="sd", ddpm_steps=250),
    "sit": dict(arch="dit", objective="flow", learn_sigma=True, reversed_time=True, cfg_channels=3, ig_head=False,
                latents_of="sd"),
    "ig-sit": dict(arch="dit", objective="flow", learn_sigma=False, reversed_time=False, cfg_channels=None,
                   ig_head=True, latents_of="sd"),
    "ig-lightningdit": dict(arch="lightningdit", objective="flow", learn_sigma=False, reversed_time=False,
                            cfg_channels=None, ig_head=True, latents_of="vavae-f16d32", default_sampler="heun",
                            heun_steps=124, heun_shift=0.3, heun_last_step="heun"),
}
ARCHITECTURES = {"dit": (DiT, MODELS), "lightningdit": (LightningDiT, LIGHTNINGDIT_MODELS)}  # class, presets
DECODE_BATCH = 32  # images per VAE decoder call


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder (uses its latest.pt) or checkpoint file")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--labels", choices=("balanced", "random"), default="balanced",
                        help="label of sample i: i mod num_classes, or drawn from a generator seeded by seed + i (the "
                             "IG release's 'random sampling')")
    parser.add_argument("--class-label", type=int, help="one label for every sample")
    parser.add_argument("--sampler", choices=sum(SAMPLERS.values(), ()),
                        help="default: em (flow), ddpm (eps), heun (ig-lightningdit)")
    parser.add_argument("--steps", type=int, help="em 250, heun 50 (ig-lightningdit 124), ddim 50 by default; ddpm: "
                        "every step of an own run, 250 for dit (fewer: respaced as ADM / DiT)")
    parser.add_argument("--timestep-shift", type=float,
                        help="heun: LightningDiT's timestep shift of the grid (1 uniform, the default; ig-lightningdit "
                             "0.3; ref.samplers.shifted_grid)")
    parser.add_argument("--eta", type=float, default=0.0, help="ddim: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--diffusion", choices=tuple(DIFFUSIONS), default="ig",
                        help="em: g(t)^2 = 2t (ig: REPA / IG release; also SiT's sample.py default) or SiT's SBDM")
    parser.add_argument("--ig", type=float, default=1.0, help="IG weight w: D_i + w (D_f - D_i); 1 = off")
    parser.add_argument("--ig-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    parser.add_argument("--cfg", type=float, default=1.0, help="CFG weight s; 1 = off")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    parser.add_argument("--bf16", action="store_true", help="CUDA: run the network under bf16 autocast")
    parser.add_argument("--grid-rows", type=int, default=8, help="rows of grid.png (the first samples)")
    parser.add_argument("--seeds-per-control", type=int, default=1,
                        help="controlnet runs: samples per evaluation scene (sample i follows scene i // this)")
    parser.add_argument("--out", help="output folder (default: samples-<settings> beside the checkpoint)")
    parser.add_argument("--png", action="store_true", help="also write each image as OUT/images/<i:06d>.png")
    latent = parser.add_argument_group("latent models: decoding to images")
    latent.add_argument("--vae", help="VAE weights (ref.latents.read_vae); without it the latents are written")
    latent.add_argument("--vae-kind", choices=list(VAE_MODELS),
                        help="its preset (default: the run's config `vae`, sd for dit / sit / ig-sit, vavae-f16d32 "
                             "for ig-lightningdit); a foreign checkpoint's latents have its channels and 1/f of "
                             "--image-size")
    latent.add_argument("--latent-stats", help=f"per-channel latent statistics ({STATS_FILE}) of a model trained on "
                        f"normalised latents (LightningDiT); an own run's default: <its data_path>/{STATS_FILE}")
    foreign = parser.add_argument_group("foreign checkpoints (official DiT / SiT, IG-release SiT and LightningDiT)")
    foreign.add_argument("--checkpoint-kind", choices=("own", *CHECKPOINT_KINDS), default="own")
    foreign.add_argument("--model", choices=[*MODELS, *LIGHTNINGDIT_MODELS], help="size preset of a foreign checkpoint")
    foreign.add_argument("--image-size", type=int, default=256,
                         help="image side; the latents are 1/f of it (f: 8 sd, 16 vavae-f16d32)")
    foreign.add_argument("--num-classes", type=int, default=1000)
    foreign.add_argument("--intermediate-block", type=int,
                         help=f"ig-sit, ig-lightningdit: the IG head's block when the file does not say (default "
                              f"{IG_RELEASE_HEAD_BLOCK}); one that differs from the file's is refused")
    return parser.parse_args(argv)


def checkpoint_file(run):
    """The checkpoint of RUN: the file itself, or a run folder's latest.pt."""
    path = Path(run)
    path = path / "latest.pt" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    return path


def default_out(path, tag):
    """samples-TAG beside the checkpoint; for any file but latest.pt (a snapshot) samples-<its name>-TAG."""
    return path.parent / ("samples-" + ("" if path.name == "latest.pt" else path.stem + "-") + tag)


def foreign_head_block(args, kind, contents):
    """The IG head's block of a foreign checkpoint (None: no head); combinations that cannot be right raise."""
    if not CHECKPOINT_KINDS[kind]["ig_head"]:
        if args.intermediate_block is not None:
            raise ValueError(f"a {kind} checkpoint has no IG intermediate head; --intermediate-block is for ig-sit "
                             f"and ig-lightningdit")
        return None
    in_file = ig_release_head_block(contents)
    if in_file is not None and args.intermediate_block not in (None, in_file):
        raise ValueError(f"the checkpoint's training settings put the IG head after block {in_file} (encoder_depth); "
                         f"--intermediate-block {args.intermediate_block} would read it as another block")
    return in_file or args.intermediate_block or IG_RELEASE_HEAD_BLOCK


def check_kind_flags(args):
    own = args.checkpoint_kind == "own"
    if own and (args.model or args.intermediate_block is not None):
        raise ValueError(f"--model and --intermediate-block describe a foreign checkpoint (--checkpoint-kind "
                         f"{', '.join(CHECKPOINT_KINDS)}); a train.py run brings its own")
    if not own and args.model is None:
        raise ValueError(f"--checkpoint-kind {args.checkpoint_kind} needs --model, the checkpoint's size preset")
    if not own:
        presets = ARCHITECTURES[CHECKPOINT_KINDS[args.checkpoint_kind]["arch"]][1]
        if args.model not in presets:
            raise ValueError(f"--model {args.model} is no preset of a {args.checkpoint_kind} checkpoint; it takes one "
                             f"of {', '.join(presets)}")
    if args.class_label is not None and args.labels == "random":
        raise ValueError("--class-label gives every sample one label; --labels random draws them")


def key_names(state):
    """The key names of a state dict with the block numbers left out: what says which network it is."""
    return {re.sub(r"\.\d+\.", ".N.", canonical_key(key)) for key in state}


def kinds_with_keys_of(state):
    """The checkpoint kinds whose networks have the key names of `state` (sizes aside)."""
    found = []
    for kind, spec in CHECKPOINT_KINDS.items():
        network, _ = ARCHITECTURES[spec["arch"]]
        options = dict(learn_sigma=spec["learn_sigma"]) if network is DiT else {}
        with torch.device("meta"):
            smallest = network(input_size=2, patch_size=1, hidden_size=8, depth=1, num_heads=2,
                               intermediate_block=1 if spec["ig_head"] else None, **options)
        if key_names(smallest.state_dict()) == key_names(state):
            found.append(kind)
    return found


def load_foreign_weights(args, model, contents):
    """The file's weights into `model`; a file that does not fit raises one line: its problems, each with a count
    and its first key, and the kinds whose networks have its keys."""
    try:
        load_checkpoint(model, contents, prefer=args.weights)
    except ValueError as error:
        fits = kinds_with_keys_of(unwrap_state(contents, args.weights)[0])
        if args.checkpoint_kind in fits:
            hint = "; its key names are those of this kind: another --model, --image-size or --vae-kind?"
        else:
            hint = f"; its key names are those of --checkpoint-kind {' or '.join(fits)}" if fits else ""
        raise ValueError(f"{args.run} does not fit {args.model} as --checkpoint-kind {args.checkpoint_kind}: "
                         f"{misfit_line(error)}{hint}") from None


def latent_spec(trained_on, decoder, store=None):
    """What a latent model's spec says of its latents, trained_on the VAE preset it was trained on (None: a pixel
    model), store how its training data held them (prepare.py's store; None: the VAE's recipe): vae_kind, the
    decoder's preset; latent_encoding, how its latents relate to the VAE's: "stats" (stored posterior samples,
    normalised per channel with a statistics file: LightningDiT's recipe) or "scale" (moments or plain latents, times
    the VAE's scaling_factor, 0.18215 for sd: DiT / SiT)."""
    if trained_on is None:
        return dict(vae_kind=None, latent_encoding=None, scaling_factor=None)
    store = store or RECIPES[trained_on]["store"]
    return dict(vae_kind=decoder or trained_on, latent_encoding="stats" if store == "sample" else "scale",
                scaling_factor=on_meta(trained_on).scaling_factor)


def training_store(config):
    """How an own latent run's shards held its latents (prepare.json in its data folder), or None when that folder is
    not on this machine (the VAE's recipe is assumed then)."""
    data_path = config.get("data_path")
    return shard_settings(data_path)["store"] if data_path and Path(data_path).is_dir() else None


def load_model(args, path, checkpoint):
    """-> (model with the chosen weights, spec: checkpoint_kind, objective, learn_sigma, reversed_time, cfg_channels,
    ddpm_steps, beta_schedule, latent, vae_kind (the decoder's preset), latent_encoding, scaling_factor, step, config,
    checkpoint, and a foreign kind's sampler defaults), or ValueError.
    checkpoint: the train.py checkpoint at path (kind own), or None for a foreign one."""
    if args.checkpoint_kind == "own":
        model, config = runtime.load_trained_network(path, "dit", dit_from_config, args.weights, checkpoint)
        latent = config["data"] == "latents"
        trained_on = config.get("vae", "sd") if latent else None  # the VAE of its latents; configs before the field: sd
        return model, dict(checkpoint_kind="own", objective=config["objective"], learn_sigma=False,
                           reversed_time=False, cfg_channels=None, ddpm_steps=None,
                           beta_schedule=config["beta_schedule"], latent=latent,
                           **latent_spec(trained_on, args.vae_kind, training_store(config) if latent else None),
                           step=checkpoint["step"], config=config,
                           checkpoint=str(path))
    kind = CHECKPOINT_KINDS[args.checkpoint_kind]
    vae_kind = args.vae_kind or kind["latents_of"]
    layout = on_meta(vae_kind)  # the latents: its z_channels, 1/f of the image side
    if args.image_size % layout.downsampling_factor:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of the {vae_kind!r} VAE's downsampling "
                         f"factor {layout.downsampling_factor}")
    contents = read_checkpoint(path)
    options = dict(learn_sigma=kind["learn_sigma"]) if kind["arch"] == "dit" else {}
    model = ARCHITECTURES[kind["arch"]][1][args.model](
        input_size=args.image_size // layout.downsampling_factor, in_channels=layout.z_channels,
        num_classes=args.num_classes, intermediate_block=foreign_head_block(args, args.checkpoint_kind, contents),
        **options)
    load_foreign_weights(args, model, contents)
    return model, dict(kind, checkpoint_kind=args.checkpoint_kind, ddpm_steps=kind.get("ddpm_steps"),
                       beta_schedule="linear", latent=True, **latent_spec(kind["latents_of"], vae_kind), step=None,
                       config=None, checkpoint=str(path))


def read_decoding(args, model, spec):
    """What turns the sampled latents into images, read and checked before sampling: (VAE or None, statistics
    (mean, std) or None). Without --vae the latents are written, so the statistics are read all the same."""
    if not spec["latent"]:
        if args.vae or args.vae_kind or args.latent_stats:
            raise ValueError("--vae, --vae-kind and --latent-stats are for latent models; this one samples pixels")
        return None, None
    channels = on_meta(spec["vae_kind"]).z_channels
    if channels != model.in_channels:
        raise ValueError(f"a {spec['vae_kind']!r} VAE has {channels} latent channels, this model "
                         f"{model.in_channels}; choose the VAE of its latents with --vae-kind")
    stats = None
    if spec["latent_encoding"] == "stats":
        stats_path = args.latent_stats
        if stats_path is None and spec["config"] is not None:
            stats_path = Path(spec["config"]["data_path"]) / STATS_FILE
        if stats_path is None:
            raise ValueError(f"a {spec['checkpoint_kind']} model samples latents normalised per channel; "
                             f"--latent-stats PATH ({STATS_FILE} of the release or of prepare.py) is needed")
        stats = read_latent_stats(stats_path)
        if stats[0].shape[1] != model.in_channels:
            raise ValueError(f"{stats_path} holds statistics of {stats[0].shape[1]} channels, this model's latents "
                             f"have {model.in_channels}")
    elif args.latent_stats:
        raise ValueError(f"--latent-stats is for latents normalised per channel (LightningDiT); this model's are "
                         f"scaled by {spec['scaling_factor']:g}")
    return (read_vae(args.vae, spec["vae_kind"]) if args.vae else None), stats


def make_sampler(args, model, spec):
    """-> (integrate(denoise, noise, draws) -> x0 (N, C, H, W) float64, the network as the sampler calls it
    (x, t, y) -> (final, intermediate), the factor from t in [0, 1] to the model's time (1 for flow, T for DDPM),
    sampler name, steps)."""
    objective = spec["objective"]
    sampler = args.sampler or spec.get("default_sampler") or SAMPLERS[objective][0]
    if sampler not in SAMPLERS[objective]:
        raise ValueError(f"--sampler {sampler} does not fit a {spec['checkpoint_kind']} checkpoint, which predicts "
                         f"{objective}; choose one of {SAMPLERS[objective]}")
    if args.diffusion != "ig" and sampler != "em":
        raise ValueError(f"--diffusion {args.diffusion} is the em sampler's diffusion coefficient, not {sampler}'s")
    if args.timestep_shift is not None and sampler != "heun":
        raise ValueError(f"--timestep-shift shifts the heun sampler's grid, not {sampler}'s")
    steps = args.steps or spec.get(f"{sampler}_steps") or DEFAULT_STEPS.get(sampler)
    network = reversed_time(model) if spec["reversed_time"] else model
    if sampler == "em":  # SiT / IG: `steps` points 1 -> 0.04, then the deterministic mean step to 0
        grid = uniform_grid(steps, t_max=SBDM_T_MAX if args.diffusion == "sbdm" else 1.0)

        def integrate(denoise, noise, draws):
            return euler_maruyama(denoise, noise, grid, randn_like=draws.randn_like,
                                  diffusion=DIFFUSIONS[args.diffusion])
        return integrate, network, 1.0, sampler, steps
    if sampler == "heun":  # uniform in t unless shifted; the last step Euler, or Heun as the LightningDiT release
        shift = spec.get("heun_shift", 1.0) if args.timestep_shift is None else args.timestep_shift
        grid = shifted_grid(steps, shift)
        euler_last = spec.get("heun_last_step", "euler") == "euler"

        def integrate(denoise, noise, draws):
            return heun(denoise, noise, grid, euler_last=euler_last)
        return integrate, network, 1.0, sampler, steps
    schedule = DDPMSchedule.named(spec["beta_schedule"])
    if sampler == "ddim":
        timesteps = spaced_timesteps(schedule, steps)

        def integrate(denoise, noise, draws):
            return ddim(denoise, noise, schedule, timesteps, eta=args.eta, randn_like=draws.randn_like)
        return integrate, network, schedule.num_timesteps, sampler, steps
    kept = respaced_timesteps(schedule.num_timesteps, steps or schedule.num_timesteps)  # steps None: every one
    respaced = schedule.respaced(kept)
    if spec["learn_sigma"]:
        def network(x, t, y):  # DiT's learned variance: the prediction and the variance channels
            return model(x, t, y, with_variance=True)

    def integrate(denoise, noise, draws):
        return ddpm_ancestral(denoise, noise, respaced, randn_like=draws.randn_like, model_timesteps=kept,
                              learned_variance=spec["learn_sigma"])
    return integrate, network, schedule.num_timesteps, sampler, len(kept)


def check_guidance(args, model):
    if args.ig != 1.0 and model.intermediate_head is None:
        raise ValueError("--ig needs a model with the IG intermediate head (this one has none)")
    if args.cfg != 1.0 and model.class_dropout_prob == 0:
        raise ValueError("--cfg needs a model trained with label dropout (this one has no null label)")
    if args.class_label is not None and not 0 <= args.class_label < model.num_classes:
        raise ValueError(f"--class-label must be in [0, {model.num_classes}), got {args.class_label}")


def sample_labels(indices, args, num_classes):
    """Label of sample i: --class-label; else i mod num_classes (--labels balanced), or drawn uniformly from numpy's
    generator seeded with the sample's seed, seed + i (--labels random; a stream apart from its torch noise
    generator), so they do not depend on the batch size or the ranks. (n,) int64"""
    if args.class_label is not None:
        return np.full(len(indices), args.class_label)
    if args.labels == "balanced":
        return indices % num_classes
    return np.array([np.random.default_rng(args.seed + int(i)).integers(num_classes) for i in indices], np.int64)


def finish(x, spec, decoding):
    """Sampled x (n, C, H, W) float32 on the device -> what is written: uint8 images (n, H', W', 3) (pixels, or
    latents decoded by the VAE) or the latents as the decoder takes them (n, C, H, W) float32."""
    if not spec["latent"]:
        return to_uint8(x.cpu())
    vae, stats = decoding
    z = x / spec["scaling_factor"] if stats is None else denormalise_latents(x, stats)  # the VAE's own latents
    if vae is None:
        return z.cpu().numpy()
    return to_uint8(vae.decode(z, slice_size=DECODE_BATCH).float().cpu())


def no_outputs(model, spec, vae):
    """finish's output for no samples (a rank may have none): (0, C, h, w) float32 or (0, H, W, 3) uint8."""
    side = model.input_size
    if spec["latent"] and vae is None:
        return np.zeros((0, model.in_channels, side, side), np.float32)
    side *= vae.downsampling_factor if spec["latent"] else 1
    return np.zeros((0, side, side, 3), np.uint8)


def sample_share(args, model, spec, sampling, world, decoding=(None, None)):
    """This rank's samples r, r + W, ... -> ((indices, outputs), network evaluations per sample, counted). outputs:
    uint8 images (n, H, W, 3) or latents (n, C, h, w). sampling: make_sampler's (integrate, network, interval_scale);
    decoding: read_decoding's (VAE, statistics), applied batch by batch on the sampling device."""
    integrate, network, interval_scale = sampling
    rows = 0

    def counted_network(x, t, y):
        nonlocal rows
        rows += len(x)
        return network(x, t, y)
    indices = np.arange(world.rank, args.num_samples, world.world_size)
    shape = (model.in_channels, model.input_size, model.input_size)
    outputs = [no_outputs(model, spec, decoding[0])]
    for start in range(0, len(indices), args.batch_size):
        batch = indices[start:start + args.batch_size]
        draws = runtime.SampleDraws(args.seed + int(i) for i in batch)
        labels = torch.as_tensor(sample_labels(batch, args, model.num_classes), device=world.device)
        denoise = guided_denoiser(counted_network, labels, model.num_classes, w_ig=args.ig, w_cfg=args.cfg,
                                  ig_interval=[interval_scale * t for t in args.ig_interval],
                                  cfg_interval=[interval_scale * t for t in args.cfg_interval],
                                  cfg_channels=spec["cfg_channels"])
        with runtime.autocast(world.device, args.bf16):
            x = integrate(denoise, draws.randn(*shape).to(world.device), draws).float()  # (n, C, H, W)
            outputs.append(finish(x, spec, decoding))
    return (indices, np.concatenate(outputs)), rows / max(len(indices), 1)


# ---------------------------------------------------------------------------------------------------------------------
# ControlNet runs (the InnerControl pipeline): controls and captions of held-out shapes scenes
# ---------------------------------------------------------------------------------------------------------------------

def load_controlnet(args, path, checkpoint):
    """-> (base, controlnet, config) for a controlnet run; its base is the run's `base`."""
    if (args.sampler or "ddim") != "ddim" or args.ig != 1.0:
        raise ValueError("a controlnet run samples with DDIM (--sampler ddim) and caption CFG (--cfg); it has no IG")
    controlnet, config = runs.load_trained(path, "controlnet", args.weights, checkpoint)
    base, _ = runs.load_trained(config["base"], "unet")
    return base, controlnet, config


def controlnet_share(args, base, controlnet, config, world):
    """This rank's samples r, r + W, ...: sample i follows the control and caption of evaluation scene
    i // seeds_per_control, from noise seeded with seed + i. -> (indices, images (n, H, W, 3) uint8)"""
    scenes = Shapes(config["image_size"], num_items=args.num_samples, seed=EVAL_SCENE_SEED)
    schedule = DDPMSchedule.named(config["beta_schedule"])
    indices = np.arange(world.rank, args.num_samples, world.world_size)
    outputs = [np.zeros((0, config["image_size"], config["image_size"], 3), np.uint8)]
    for start in range(0, len(indices), args.batch_size):
        batch = indices[start:start + args.batch_size]
        samples = [scenes[int(i) // args.seeds_per_control] for i in batch]
        _, tokens, control = pipeline.collate_shapes(samples, config["task"])
        draws = runtime.SampleDraws(args.seed + int(i) for i in batch)
        hint = pipeline.hint_of(control, config["task"]).to(world.device)
        noise = draws.randn(3, config["image_size"], config["image_size"]).to(world.device)
        with runtime.autocast(world.device, args.bf16):
            images = generate(base, controlnet, schedule, hint, tokens.to(world.device), noise,
                              args.steps or DEFAULT_STEPS["ddim"], args.cfg)
        outputs.append(to_uint8(images.cpu()))
    return indices, np.concatenate(outputs)


def control_pictures(samples, scene_indices, config, seeds_per_control):
    """grid.png rows: each control as a picture, then its samples. -> (N', H, W, 3) uint8"""
    scenes = Shapes(config["image_size"], num_items=int(scene_indices.max()) + 1, seed=EVAL_SCENE_SEED)
    rows = []
    for start in range(0, len(samples), seeds_per_control):
        control = pipeline.control_of(scenes[int(scene_indices[start])], config["task"])
        rows += [pipeline.control_picture(control, config["task"]), *samples[start:start + seeds_per_control]]
    return np.stack(rows)


def sample_controlnet(args, path, base, controlnet, config):
    with runtime.distributed() as world:
        base.to(world.device), controlnet.to(world.device)
        start = time.perf_counter()
        samples = gather_in_order(controlnet_share(args, base, controlnet, config, world))
        if not world.is_main:
            return
        steps = args.steps or DEFAULT_STEPS["ddim"]
        scene_indices = np.arange(args.num_samples) // args.seeds_per_control
        settings = dict(vars(args), job="controlnet", task=config["task"], scene_seed=EVAL_SCENE_SEED, latent=False,
                        sampler="ddim", steps=steps, checkpoint=str(path), config=config,
                        network_evaluations_per_sample=steps * (2 if args.cfg != 1.0 else 1),
                        seconds=time.perf_counter() - start, world_size=world.world_size, device=str(world.device))
        tag = f"ddim{steps}-cfg{args.cfg:g}-seed{args.seed}-n{args.num_samples}x{args.seeds_per_control}"
        out = Path(args.out) if args.out else default_out(path, tag)
        write_outputs(out, samples, scene_indices, settings, 1 + args.seeds_per_control, args.grid_rows,
                      control_pictures(samples, scene_indices, config, args.seeds_per_control))
        print(f"wrote {args.num_samples} samples to {out} ({settings['seconds']:.1f} s, "
              f"{settings['network_evaluations_per_sample']} network evaluations each)")


# ---------------------------------------------------------------------------------------------------------------------
# sd15: Stable Diffusion 1.5 + ControlNet from the released weights (ref.text_to_image)
# ---------------------------------------------------------------------------------------------------------------------

SD15_HELP = """Text-to-image with Stable Diffusion 1.5 steered by a ControlNet 1.0 / 1.1, from local weight files.

    python sample.py sd15 --sd15 v1-5-pruned-emaonly.safetensors --controlnet control_v11f1p_sd15_depth.pth \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz --prompts prompts.txt --controls depth/ [--out DIR] [--steps 50]
        [--cfg 7.5] [--control-scale 1.0] [--seeds-per-prompt 1] [--seed 0] [--batch-size 4] [--size 512]
        [--dtype fp32|bf16|fp16] [--png] [--controlnet-plus-plus]
    torchrun --nproc_per_node=N sample.py sd15 ...

Pairs: --prompts PROMPTS.txt holds one prompt per line, matched in order to the control images of --controls DIR
sorted by file name (.png, .jpg, .jpeg, .bmp, .webp); the counts must be equal. Or --prompts PAIRS.jsonl, one
{"prompt": ..., "control": PATH} a line, PATH relative to --controls DIR when given, else to the .jsonl's folder.
A control is an RGB image the size of the output (--size; 8x the latent side), fed to the ControlNet in [0, 1]; an
image of another size is resized to SIZE x SIZE (Lanczos, aspect not kept) with a warning: give segmentation maps at
the right size, or their colours blend at the borders. Prompts longer than 77 tokens are cut with a warning.
Sampling: DDIM, eta 0, SD's leading timesteps (steps_offset 1; 50 steps: 981, 961, .., 1), the last step to abar_0,
CFG on the text against the empty prompt with the control in both branches (--cfg 1: the text branch alone), the
ControlNet's residuals times --control-scale; VAE decode of latents / 0.18215.
Sample i follows pair i // seeds-per-prompt and its own noise generator seeded with seed + i: the same images at any
batch size or number of ranks (up to float rounding). Rank r takes samples r, r + W, ..; rank 0 writes OUT/samples.npz
(ADM: arr_0 uint8 N x S x S x 3, arr_1 the pair of each sample), OUT/grid.png (each control beside its samples),
OUT/settings.json (with every prompt and control) and, with --png, OUT/images/<pair>_<k>.png (k: the seed within
the pair). Bad input: one error line, exit status 2, nothing written.
"""
SD15_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONTROL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# ControlNet++'s evaluation (Li et al. 2024), which InnerControl follows: 4 images a prompt, DDIM 50, CFG 7.5, 512 px.
CONTROLNET_PLUS_PLUS = dict(seeds_per_prompt=4, steps=50, cfg=7.5, size=512)
SD15_DEFAULTS = dict(seeds_per_prompt=1, steps=50, cfg=7.5, size=512)


def parse_sd15_args(argv):
    parser = argparse.ArgumentParser(prog="sample.py sd15", description=SD15_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15", required=True, help="SD1.5 single file (v1-5-pruned-emaonly.safetensors / .ckpt)")
    parser.add_argument("--controlnet", required=True, help="ControlNet 1.0 / 1.1 file (control_v11f1p_sd15_depth.pth, "
                        "...) or a diffusers ControlNet folder")
    parser.add_argument("--tokenizer", required=True,
                        help="CLIP's bpe_simple_vocab_16e6.txt.gz, or a folder holding vocab.json and merges.txt")
    parser.add_argument("--prompts", required=True, help="PROMPTS.txt (one a line) or PAIRS.jsonl (see above)")
    parser.add_argument("--controls", help="folder of control images (required with a .txt of prompts)")
    parser.add_argument("--out", help="output folder (default: samples-sd15-<controlnet>-<settings> here)")
    parser.add_argument("--steps", type=int, help=f"DDIM steps (default {SD15_DEFAULTS['steps']})")
    parser.add_argument("--cfg", type=float, help=f"CFG weight; 1 = off (default {SD15_DEFAULTS['cfg']})")
    parser.add_argument("--control-scale", type=float, default=1.0, help="multiplies the ControlNet's residuals")
    parser.add_argument("--seeds-per-prompt", type=int, help="samples a pair (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=4, help="per rank (CFG runs twice as many rows)")
    parser.add_argument("--size", type=int, help=f"image side in pixels (default {SD15_DEFAULTS['size']})")
    parser.add_argument("--dtype", choices=tuple(SD15_DTYPES), default="fp32", help="the networks' dtype")
    parser.add_argument("--png", action="store_true", help="also write one PNG per sample to OUT/images/")
    parser.add_argument("--grid-rows", type=int, default=8, help="pairs shown in grid.png")
    parser.add_argument("--controlnet-plus-plus", action="store_true",
                        help="ControlNet++'s evaluation settings: 4 seeds a prompt, 50 steps, CFG 7.5, 512 px")
    parser.add_argument("--architecture", choices=tuple(text_to_image.ARCHITECTURES), default="sd15",
                        help="tiny: the test-sized networks of ref.text_to_image")
    return parser.parse_args(argv)


def resolve_sd15_settings(args):
    """Fill the unset --seeds-per-prompt / --steps / --cfg / --size from the protocol or the defaults; a value that
    contradicts --controlnet-plus-plus raises."""
    for name, default in SD15_DEFAULTS.items():
        protocol = CONTROLNET_PLUS_PLUS[name] if args.controlnet_plus_plus else default
        if getattr(args, name) not in (None, protocol) and args.controlnet_plus_plus:
            raise ValueError(f"--controlnet-plus-plus fixes --{name.replace('_', '-')} {protocol}, got "
                             f"{getattr(args, name)}")
        setattr(args, name, protocol if getattr(args, name) is None else getattr(args, name))
    for name in ("steps", "seeds_per_prompt", "batch_size", "grid_rows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def read_pairs(prompts_file, controls):
    """-> [(prompt, control image path)], see SD15_HELP; every control file must exist."""
    prompts_path = Path(prompts_file)
    if not prompts_path.is_file():
        raise ValueError(f"--prompts {prompts_path}: no such file")
    text = prompts_path.read_text(encoding="utf-8")
    if prompts_path.suffix == ".jsonl":
        folder = Path(controls) if controls else prompts_path.parent
        pairs = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                pairs.append((entry["prompt"], folder / entry["control"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{prompts_path} line {number}: expected a JSON object with \"prompt\" and "
                                 f"\"control\", found {line[:80]!r}") from None
    else:
        if controls is None:
            raise ValueError("--controls DIR is needed with a text file of prompts (or give a .jsonl of pairs)")
        if not Path(controls).is_dir():
            raise ValueError(f"--controls {controls}: no such folder")
        images = sorted(path for path in Path(controls).iterdir() if path.suffix.lower() in CONTROL_SUFFIXES)
        prompts = text.splitlines()
        if len(prompts) != len(images):
            raise ValueError(f"{prompts_path} holds {len(prompts)} prompts, {controls} {len(images)} control images "
                             f"({', '.join(CONTROL_SUFFIXES)}); one prompt a control, matched in sorted order")
        pairs = list(zip(prompts, images))
    if not pairs:
        raise ValueError(f"{prompts_path}: no prompts")
    missing = [str(path) for _, path in pairs if not path.is_file()]
    if missing:
        raise ValueError(f"control images missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return pairs


def read_control(path, size, warn=False):
    """A control image -> (size, size, 3) uint8 RGB, resized (Lanczos) when it is another size (warn: say so)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError as error:
        raise ValueError(f"{path}: not an image ({error})") from None
    if image.size != (size, size):
        if warn:
            print(f"warning: control {path} is {image.width}x{image.height}; resized to {size}x{size}",
                  file=sys.stderr)
        image = image.resize((size, size), Image.LANCZOS)
    return np.array(image)  # a writable copy, for torch.from_numpy


@torch.no_grad()
def sd15_share(args, networks, pairs, tokens, null_tokens, world):
    """This rank's samples r, r + W, ..: sample i follows pair i // seeds_per_prompt from latent noise seeded with
    seed + i. tokens: (P, 77) of the prompts, null_tokens (1, 77) of the empty one. -> (indices, images (n, S, S, 3)
    uint8)"""
    num_samples = len(pairs) * args.seeds_per_prompt
    side = text_to_image.latent_side(networks, args.size)
    null_context = networks.text_encoder(null_tokens.to(world.device))  # (1, 77, D)
    indices = np.arange(world.rank, num_samples, world.world_size)
    outputs = [np.zeros((0, args.size, args.size, 3), np.uint8)]
    for start in range(0, len(indices), args.batch_size):
        batch = indices[start:start + args.batch_size]
        pair_indices = batch // args.seeds_per_prompt
        hint = torch.stack([torch.from_numpy(read_control(pairs[p][1], args.size)) for p in pair_indices])
        hint = hint.permute(0, 3, 1, 2).to(world.device, torch.float32) / 255  # (n, 3, S, S) in [0, 1]
        context = networks.text_encoder(tokens[pair_indices].to(world.device))  # (n, 77, D)
        noise = runtime.SampleDraws(args.seed + int(i) for i in batch).randn(4, side, side).to(world.device)
        images = text_to_image.generate(networks, context, null_context, hint, noise, args.steps, args.cfg,
                                        args.control_scale)
        outputs.append(to_uint8(images.cpu()))
    return indices, np.concatenate(outputs)


def sd15_grid_pictures(samples, pairs, args):
    """grid.png rows: each control, then its samples. -> (N', S, S, 3) uint8"""
    rows = []
    for pair in range(min(len(pairs), args.grid_rows)):
        first = pair * args.seeds_per_prompt
        rows += [read_control(pairs[pair][1], args.size), *samples[first:first + args.seeds_per_prompt]]
    return np.stack(rows)


def load_sd15_inputs(args):
    """Everything sd15 reads, checked before anything is written. -> (pairs, tokenizer, networks)"""
    resolve_sd15_settings(args)
    missing = [f"--{flag} {path}" for flag, path in (("sd15", args.sd15), ("controlnet", args.controlnet),
                                                     ("tokenizer", args.tokenizer)) if not Path(path).exists()]
    if missing:
        raise ValueError(f"no such file: {', '.join(missing)}")
    pairs = read_pairs(args.prompts, args.controls)
    tokenizer = CLIPTokenizer.from_path(args.tokenizer)
    networks = text_to_image.load_networks(args.architecture, args.sd15, args.controlnet, SD15_DTYPES[args.dtype])
    text_to_image.check_tokenizer(tokenizer, networks.text_encoder)
    text_to_image.latent_side(networks, args.size)
    text_to_image.sampling_timesteps(args.steps)
    for _, path in pairs:
        read_control(path, args.size, warn=True)
    return pairs, tokenizer, networks


def sample_sd15(argv):
    args = parse_sd15_args(argv)
    try:  # bad input stops here, before anything is written
        pairs, tokenizer, networks = load_sd15_inputs(args)
        with warnings.catch_warnings(record=True) as truncated:  # prompts over 77 tokens, each named
            warnings.simplefilter("always")
            tokens = tokenizer([prompt for prompt, _ in pairs])  # (P, 77)
        for warning in truncated:
            print(f"warning: {warning.message}", file=sys.stderr)
    except ValueError as error:
        runtime.exit_with_error(error)
    with runtime.distributed() as world:
        for network in networks:
            network.to(world.device)
        start = time.perf_counter()
        samples = gather_in_order(sd15_share(args, networks, pairs, tokens, tokenizer([""]), world))
        if not world.is_main:
            return
        num_samples = len(samples)
        settings = dict(vars(args), job="sd15-controlnet", latent=False, sampler="ddim", eta=0.0,
                        timesteps=text_to_image.sampling_timesteps(args.steps).tolist(), final_abar="abar_0",
                        num_samples=num_samples,
                        network_evaluations_per_sample=args.steps * (2 if args.cfg != 1.0 else 1),
                        pairs=[dict(prompt=prompt, control=str(path)) for prompt, path in pairs],
                        seconds=time.perf_counter() - start, world_size=world.world_size, device=str(world.device))
        tag = f"ddim{args.steps}-cfg{args.cfg:g}-cs{args.control_scale:g}-seed{args.seed}-n{num_samples}"
        out = Path(args.out) if args.out else Path(f"samples-sd15-{Path(args.controlnet).stem}-{tag}")
        write_outputs(out, samples, np.arange(num_samples) // args.seeds_per_prompt, settings,
                      1 + args.seeds_per_prompt, args.grid_rows, sd15_grid_pictures(samples, pairs, args))
        if args.png:
            write_pngs(out / "images", samples,  # <pair>_<k>.png
                       lambda index: "{:05d}_{}.png".format(*divmod(index, args.seeds_per_prompt)))
        print(f"wrote {num_samples} samples to {out} ({settings['seconds']:.1f} s)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sd15"]:
        return sample_sd15(argv[1:])
    args = parse_args(argv)
    try:  # bad input stops here, before anything is written
        check_kind_flags(args)
        path = checkpoint_file(args.run)
        checkpoint = runtime.read_run_checkpoint(path) if args.checkpoint_kind == "own" else None
        controlled = checkpoint is not None and checkpoint["args"]["job"] == "controlnet"
        if controlled:
            networks = load_controlnet(args, path, checkpoint)
        else:
            model, spec = load_model(args, path, checkpoint)
            integrate, network, interval_scale, sampler, steps = make_sampler(args, model, spec)
            check_guidance(args, model)
            decoding = read_decoding(args, model, spec)
    except ValueError as error:
        runtime.exit_with_error(error)
    if controlled:
        return sample_controlnet(args, path, *networks)
    with runtime.distributed() as world:
        model.to(world.device).eval()
        if decoding[0] is not None:  # the VAE
            decoding[0].to(world.device)
        start = time.perf_counter()
        share, evaluations = sample_share(args, model, spec, (integrate, network, interval_scale), world, decoding)
        samples = gather_in_order(share)
        if not world.is_main:
            return
        settings = dict(vars(args), **spec, sampler=sampler, steps=steps,
                        network_evaluations_per_sample=int(evaluations) if evaluations.is_integer() else evaluations,
                        seconds=time.perf_counter() - start, world_size=world.world_size, device=str(world.device))
        tag = f"{sampler}{steps}-ig{args.ig:g}-cfg{args.cfg:g}-seed{args.seed}-n{args.num_samples}"
        out = Path(args.out) if args.out else default_out(path, tag)
        columns = model.num_classes if model.num_classes <= 16 else 8
        write_outputs(out, samples, sample_labels(np.arange(args.num_samples), args, model.num_classes), settings,
                      columns, args.grid_rows)
        print(f"wrote {args.num_samples} samples to {out} ({settings['seconds']:.1f} s, "
              f"{settings['network_evaluations_per_sample']} network evaluations each)")


if __name__ == "__main__":
    main()
