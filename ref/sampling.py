"""Sampling a class-conditional DiT / SiT / LightningDiT, a train.py run or a foreign checkpoint (official DiT / SiT,
the IG release's SiT and LightningDiT): what each checkpoint kind is, its network built and loaded, the sampler it
takes, this rank's share of the samples under IG / CFG, and the decoding of latents into images. sample.py's docstring
describes the kinds, their sampling protocols and the per-sample seeds.
"""
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ref import runtime
from ref.checkpoints import misfit_line, read_checkpoint, unwrap_state
from ref.data import to_uint8
from ref.dit import (DiT, IG_RELEASE_HEAD_BLOCK, MODELS, canonical_key, ig_release_head_block, load_checkpoint,
                     reversed_time)
from ref.guidance import guided_denoiser
from ref.internal_guidance import dit_from_config
from ref.latents import RECIPES, STATS_FILE, denormalise_latents, on_meta, read_latent_stats, read_vae, shard_settings
from ref.lightningdit import MODELS as LIGHTNINGDIT_MODELS
from ref.lightningdit import LightningDiT
from ref.samplers import (DIFFUSIONS, SBDM_T_MAX, ddim, ddpm_ancestral, euler_maruyama, heun, respaced_timesteps,
                          shifted_grid, spaced_timesteps, uniform_grid)
from ref.schedules import DDPMSchedule

SAMPLERS = {"flow": ("em", "heun"), "eps": ("ddpm", "ddim")}  # the first is the default
DEFAULT_STEPS = {"em": 250, "heun": 50, "ddim": 50}  # ddpm: every step of an own run, DiT's 250 for dit
# What a foreign checkpoint is (see sample.py's docstring): the network family (its --model presets), the objective it
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


class ForeignModel(NamedTuple):
    """A foreign checkpoint's network as sample.py's flags give it: the file as named (in errors), its size preset
    (--model), image side, class count, and the IG head's block when the file does not say (--intermediate-block)."""
    name: str
    preset: str
    image_size: int
    num_classes: int
    intermediate_block: int | None


class SampleSettings(NamedTuple):
    """What sample_share draws (sample.py's flags of the same names): how many samples, the first one's seed, the
    batch per rank, the labels (balanced, random or one class_label), IG and CFG with their intervals of t, bf16."""
    num_samples: int
    seed: int
    batch_size: int
    labels: str  # balanced | random
    class_label: int | None
    ig: float
    ig_interval: tuple
    cfg: float
    cfg_interval: tuple
    bf16: bool


def foreign_head_block(kind, contents, intermediate_block=None):
    """The IG head's block of a foreign checkpoint (None: no head); combinations that cannot be right raise."""
    if not CHECKPOINT_KINDS[kind]["ig_head"]:
        if intermediate_block is not None:
            raise ValueError(f"a {kind} checkpoint has no IG intermediate head; --intermediate-block is for ig-sit "
                             f"and ig-lightningdit")
        return None
    in_file = ig_release_head_block(contents)
    if in_file is not None and intermediate_block not in (None, in_file):
        raise ValueError(f"the checkpoint's training settings put the IG head after block {in_file} (encoder_depth); "
                         f"--intermediate-block {intermediate_block} would read it as another block")
    return in_file or intermediate_block or IG_RELEASE_HEAD_BLOCK


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


def load_foreign_weights(model, contents, foreign, kind, weights="ema"):
    """The file's weights into `model`; a file that does not fit raises one line: its problems, each with a count
    and its first key, and the kinds whose networks have its keys."""
    try:
        load_checkpoint(model, contents, prefer=weights)
    except ValueError as error:
        fits = kinds_with_keys_of(unwrap_state(contents, weights)[0])
        if kind in fits:
            hint = "; its key names are those of this kind: another --model, --image-size or --vae-kind?"
        else:
            hint = f"; its key names are those of --checkpoint-kind {' or '.join(fits)}" if fits else ""
        raise ValueError(f"{foreign.name} does not fit {foreign.preset} as --checkpoint-kind {kind}: "
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


def load_model(path, checkpoint, kind="own", weights="ema", vae_kind=None, foreign=None):
    """-> (model with the chosen weights, spec: checkpoint_kind, objective, learn_sigma, reversed_time, cfg_channels,
    ddpm_steps, beta_schedule, latent, vae_kind (the decoder's preset), latent_encoding, scaling_factor, step, config,
    checkpoint, and a foreign kind's sampler defaults), or ValueError.
    checkpoint: the train.py checkpoint at path (kind own), or None for a foreign one (built as `foreign` says);
    vae_kind: the decoder's preset when not the one of the model's latents."""
    if kind == "own":
        model, config = runtime.load_trained_network(path, "dit", dit_from_config, weights, checkpoint)
        latent = config["data"] == "latents"
        trained_on = config.get("vae", "sd") if latent else None  # the VAE of its latents; configs before the field: sd
        return model, dict(checkpoint_kind="own", objective=config["objective"], learn_sigma=False,
                           reversed_time=False, cfg_channels=None, ddpm_steps=None,
                           beta_schedule=config["beta_schedule"], latent=latent,
                           **latent_spec(trained_on, vae_kind, training_store(config) if latent else None),
                           step=checkpoint["step"], config=config,
                           checkpoint=str(path))
    spec = CHECKPOINT_KINDS[kind]
    vae_kind = vae_kind or spec["latents_of"]
    layout = on_meta(vae_kind)  # the latents: its z_channels, 1/f of the image side
    if foreign.image_size % layout.downsampling_factor:
        raise ValueError(f"--image-size {foreign.image_size} is not a multiple of the {vae_kind!r} VAE's downsampling "
                         f"factor {layout.downsampling_factor}")
    contents = read_checkpoint(path)
    options = dict(learn_sigma=spec["learn_sigma"]) if spec["arch"] == "dit" else {}
    model = ARCHITECTURES[spec["arch"]][1][foreign.preset](
        input_size=foreign.image_size // layout.downsampling_factor, in_channels=layout.z_channels,
        num_classes=foreign.num_classes,
        intermediate_block=foreign_head_block(kind, contents, foreign.intermediate_block), **options)
    load_foreign_weights(model, contents, foreign, kind, weights)
    return model, foreign_spec(kind, vae_kind, path)


def foreign_spec(kind, vae_kind=None, path=None):
    """load_model's spec of a foreign checkpoint kind, decoded by the vae_kind preset (default: its latents' VAE)."""
    spec = CHECKPOINT_KINDS[kind]
    return dict(spec, checkpoint_kind=kind, ddpm_steps=spec.get("ddpm_steps"), beta_schedule="linear", latent=True,
                **latent_spec(spec["latents_of"], vae_kind or spec["latents_of"]), step=None, config=None,
                checkpoint=None if path is None else str(path))


def read_decoding(model, spec, vae=None, vae_kind=None, latent_stats=None):
    """What turns the sampled latents into images, read and checked before sampling: (VAE or None, statistics
    (mean, std) or None). vae: the VAE's file (--vae), vae_kind the preset asked for (--vae-kind), latent_stats the
    statistics file (--latent-stats). Without a VAE the latents are written, so the statistics are read all the same."""
    if not spec["latent"]:
        if vae or vae_kind or latent_stats:
            raise ValueError("--vae, --vae-kind and --latent-stats are for latent models; this one samples pixels")
        return None, None
    channels = on_meta(spec["vae_kind"]).z_channels
    if channels != model.in_channels:
        raise ValueError(f"a {spec['vae_kind']!r} VAE has {channels} latent channels, this model "
                         f"{model.in_channels}; choose the VAE of its latents with --vae-kind")
    stats = None
    if spec["latent_encoding"] == "stats":
        stats_path = latent_stats
        if stats_path is None and spec["config"] is not None:
            stats_path = Path(spec["config"]["data_path"]) / STATS_FILE
        if stats_path is None:
            raise ValueError(f"a {spec['checkpoint_kind']} model samples latents normalised per channel; "
                             f"--latent-stats PATH ({STATS_FILE} of the release or of prepare.py) is needed")
        stats = read_latent_stats(stats_path)
        if stats[0].shape[1] != model.in_channels:
            raise ValueError(f"{stats_path} holds statistics of {stats[0].shape[1]} channels, this model's latents "
                             f"have {model.in_channels}")
    elif latent_stats:
        raise ValueError(f"--latent-stats is for latents normalised per channel (LightningDiT); this model's are "
                         f"scaled by {spec['scaling_factor']:g}")
    return (read_vae(vae, spec["vae_kind"]) if vae else None), stats


def make_sampler(model, spec, sampler=None, steps=None, timestep_shift=None, eta=0.0, diffusion="ig"):
    """-> (integrate(denoise, noise, draws) -> x0 (N, C, H, W) float64, the network as the sampler calls it
    (x, t, y) -> (final, intermediate), the factor from t in [0, 1] to the model's time (1 for flow, T for DDPM),
    sampler name, steps). sampler, steps, timestep_shift: None for the kind's or the objective's default; eta: DDIM's;
    diffusion: the em sampler's diffusion coefficient (ref.samplers.DIFFUSIONS)."""
    objective = spec["objective"]
    sampler = sampler or spec.get("default_sampler") or SAMPLERS[objective][0]
    if sampler not in SAMPLERS[objective]:
        raise ValueError(f"--sampler {sampler} does not fit a {spec['checkpoint_kind']} checkpoint, which predicts "
                         f"{objective}; choose one of {SAMPLERS[objective]}")
    if diffusion != "ig" and sampler != "em":
        raise ValueError(f"--diffusion {diffusion} is the em sampler's diffusion coefficient, not {sampler}'s")
    if timestep_shift is not None and sampler != "heun":
        raise ValueError(f"--timestep-shift shifts the heun sampler's grid, not {sampler}'s")
    steps = steps or spec.get(f"{sampler}_steps") or DEFAULT_STEPS.get(sampler)
    network = reversed_time(model) if spec["reversed_time"] else model
    if sampler == "em":  # SiT / IG: `steps` points 1 -> 0.04, then the deterministic mean step to 0
        grid = uniform_grid(steps, t_max=SBDM_T_MAX if diffusion == "sbdm" else 1.0)

        def integrate(denoise, noise, draws):
            return euler_maruyama(denoise, noise, grid, randn_like=draws.randn_like,
                                  diffusion=DIFFUSIONS[diffusion])
        return integrate, network, 1.0, sampler, steps
    if sampler == "heun":  # uniform in t unless shifted; the last step Euler, or Heun as the LightningDiT release
        shift = spec.get("heun_shift", 1.0) if timestep_shift is None else timestep_shift
        grid = shifted_grid(steps, shift)
        euler_last = spec.get("heun_last_step", "euler") == "euler"

        def integrate(denoise, noise, draws):
            return heun(denoise, noise, grid, euler_last=euler_last)
        return integrate, network, 1.0, sampler, steps
    schedule = DDPMSchedule.named(spec["beta_schedule"])
    if sampler == "ddim":
        timesteps = spaced_timesteps(schedule, steps)

        def integrate(denoise, noise, draws):
            return ddim(denoise, noise, schedule, timesteps, eta=eta, randn_like=draws.randn_like)
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


def check_guidance(model, ig=1.0, cfg=1.0, class_label=None):
    """IG weight, CFG weight and one class label that the model cannot honour raise."""
    if ig != 1.0 and model.intermediate_head is None:
        raise ValueError("--ig needs a model with the IG intermediate head (this one has none)")
    if cfg != 1.0 and model.class_dropout_prob == 0:
        raise ValueError("--cfg needs a model trained with label dropout (this one has no null label)")
    if class_label is not None and not 0 <= class_label < model.num_classes:
        raise ValueError(f"--class-label must be in [0, {model.num_classes}), got {class_label}")


def sample_labels(indices, num_classes, seed, labels="balanced", class_label=None):
    """Label of sample i: class_label; else i mod num_classes (labels balanced), or drawn uniformly from numpy's
    generator seeded with the sample's seed, seed + i (labels random; a stream apart from its torch noise
    generator), so they do not depend on the batch size or the ranks. (n,) int64"""
    if class_label is not None:
        return np.full(len(indices), class_label)
    if labels == "balanced":
        return indices % num_classes
    return np.array([np.random.default_rng(seed + int(i)).integers(num_classes) for i in indices], np.int64)


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


def sample_share(model, spec, sampling, world, settings, decoding=(None, None), on_outputs=None, keep_below=None):
    """This rank's samples r, r + W, ... -> ((indices, outputs), network evaluations per sample, counted). outputs:
    uint8 images (n, H, W, 3) or latents (n, C, h, w). sampling: make_sampler's (integrate, network, interval_scale);
    settings: SampleSettings; decoding: read_decoding's (VAE, statistics), applied batch by batch on the sampling
    device. on_outputs(outputs, indices (b,)): called with each batch once finished, outside autocast (FID while
    sampling: ref.metrics.ImageFeatures.update); keep_below: only the samples below this index are kept and returned
    (None: all), so a run scored while sampling need not hold its images."""
    integrate, network, interval_scale = sampling
    rows = 0

    def counted_network(x, t, y):
        nonlocal rows
        rows += len(x)
        return network(x, t, y)
    indices = np.arange(world.rank, settings.num_samples, world.world_size)
    shape = (model.in_channels, model.input_size, model.input_size)
    outputs = [no_outputs(model, spec, decoding[0])]
    for start in range(0, len(indices), settings.batch_size):
        batch = indices[start:start + settings.batch_size]
        draws = runtime.SampleDraws(settings.seed + int(i) for i in batch)
        labels = torch.as_tensor(sample_labels(batch, model.num_classes, settings.seed, settings.labels,
                                               settings.class_label), device=world.device)
        denoise = guided_denoiser(counted_network, labels, model.num_classes, w_ig=settings.ig, w_cfg=settings.cfg,
                                  ig_interval=[interval_scale * t for t in settings.ig_interval],
                                  cfg_interval=[interval_scale * t for t in settings.cfg_interval],
                                  cfg_channels=spec["cfg_channels"])
        with runtime.autocast(world.device, settings.bf16):
            x = integrate(denoise, draws.randn(*shape).to(world.device), draws).float()  # (n, C, H, W)
            finished = finish(x, spec, decoding)
        if on_outputs is not None:
            on_outputs(finished, batch)
        outputs.append(finished if keep_below is None else finished[batch < keep_below])
    kept = indices if keep_below is None else indices[indices < keep_below]
    return (kept, np.concatenate(outputs)), rows / max(len(indices), 1)


