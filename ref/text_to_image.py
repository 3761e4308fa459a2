"""Text-to-image sampling with Stable Diffusion 1.5 steered by a ControlNet, from the released weights.

    prompts --tokenizer, CLIP text encoder--> context (B, 77, 768); CFG's null: the empty or a negative prompt's
    noise (B, 4, S/8, S/8) --DDIM or UniPC, eps = UNet(x, t, context, ControlNet residuals)-->
    latents --/ 0.18215, VAE decoder--> images (B, 3, S, S) in [-1, 1]

Two samplers, each as diffusers sets it up from SD1.5's scheduler_config (1000 training steps with scaled_linear
betas 0.00085 .. 0.012, ref.schedules): "ddim", DDIMScheduler: timestep_spacing "leading" with steps_offset 1 (50
steps: 981, 961, .., 1; ref.samplers.leading_timesteps) and set_alpha_to_one False: the last step goes from t = 1 to
abar_0, not to the x0 estimate; eta 0. "unipc", UniPCMultistepScheduler.from_config (the ControlNet++ and InnerControl
evaluation): multistep UniPC of order 2 with B(h) = e^h - 1 on x0 estimates, timestep_spacing "linspace" (20 steps:
999, 949, .., 50; ref.samplers.linspace_timesteps), the last step to the x0 estimate (ref.samplers.unipc).
Classifier-free guidance (Ho & Salimans 2022) on the text, eps = eps_null + w (eps_text -
eps_null), with the control in both branches (lllyasviel/ControlNet's samplers; ControlNet++'s evaluation); the
ControlNet's residuals are multiplied by the control scale (ControlNet 1.1's "control strength"). The control image is
RGB in [0, 1] (the ControlNet releases feed the annotator's map / 255), at the image size, 8x the latent side.

A set of prompt / control pairs (read_pairs: a prompt file and control images; metadata_pairs: a metadata.jsonl
folder of ref/control_data.py, its captions and the hints its ControlNets are trained on) is sampled as sample.py sd15
describes: sample i follows pair i // seeds_per_prompt from noise seeded with seed + i, rank r taking samples r, r + W.

The networks run in their own dtype; the sampler state and the timesteps stay in float64 / float32 (a bf16 timestep
would round 981 to 980).
"""
import functools
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ref import clip, controlnet, runtime, sd_checkpoints, unet, vae
from ref.control_data import ControlDataset
from ref.data import read_image, to_uint8
from ref.guidance import controlled_denoiser
from ref.samplers import ddim, leading_timesteps, linspace_timesteps, unipc
from ref.schedules import DDPMSchedule

TRAINING_TIMESTEPS = 1000
STEPS_OFFSET = 1  # SD1.5's scheduler_config


class Networks(NamedTuple):
    unet: unet.UNet
    controlnet: controlnet.ControlNet
    text_encoder: clip.CLIPTextModel
    autoencoder: vae.AutoencoderKL


# The networks of each architecture: SD1.5 with a ControlNet 1.0 / 1.1, and a test-sized one of the same shape (4
# latent channels, an 8x autoencoder, the control at the image size).
TINY_UNET = dict(in_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                 num_heads=2, context_dim=32)
ARCHITECTURES = {
    "sd15": dict(unet=unet.MODELS["sd15"], controlnet=controlnet.MODELS["sd15"],
                 text_encoder=clip.MODELS["clip-vit-l14"], autoencoder=vae.MODELS["sd"]),
    "tiny": dict(unet=functools.partial(unet.UNet, **TINY_UNET),
                 controlnet=functools.partial(controlnet.ControlNet, **TINY_UNET, hint_downsampling=8),
                 text_encoder=clip.MODELS["clip-tiny"],
                 autoencoder=functools.partial(vae.AutoencoderKL, ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1,
                                               z_channels=4, scaling_factor=0.18215)),
}


def sd15_schedule():
    return DDPMSchedule.named("scaled_linear", TRAINING_TIMESTEPS)


SAMPLERS = ("ddim", "unipc")
# What each sampler does beyond its name and timesteps, for a run's settings.json.
SAMPLER_SETTINGS = {"ddim": dict(eta=0.0, timestep_spacing="leading", final_abar="abar_0"),
                    "unipc": dict(order=2, solver_type="bh2", prediction="x0",
                                  timestep_spacing="linspace", final_abar=1.0)}


def sampling_timesteps(steps, sampler="ddim"):
    """The timesteps of `steps` steps, descending. (steps,) int64
    ddim: DDIMScheduler.from_config(SD1.5's config): leading spacing with steps_offset 1 (50 steps: 981, .., 1).
    unipc: UniPCMultistepScheduler.from_config(SD1.5's config): linspace spacing (20 steps: 999, 949, .., 50).
    UniPC's spacing is its own default: SD1.5's scheduler config names no timestep_spacing, so the PNDMScheduler it
    builds records its "leading" as a default, and from_config drops recorded defaults (diffusers 0.42.1
    configuration_utils.py:491-492); steps_offset 1 is passed on but unused by linspace."""
    if sampler == "unipc":
        return linspace_timesteps(TRAINING_TIMESTEPS, steps)
    return leading_timesteps(TRAINING_TIMESTEPS, steps, STEPS_OFFSET)


def load_networks(architecture, sd15_file, controlnet_file, dtype=torch.float32, variant=None):
    """The four networks, built on the meta device and given the files' tensors: the UNet, VAE and text encoder from
    an SD1.5 single file or diffusers pipeline folder, the ControlNet from a ControlNet 1.0 / 1.1 file or diffusers
    folder. A diffusers folder's networks are built from its config.json (sd_checkpoints.folder_builds), a single
    file's from `architecture`'s presets; `variant` (fp16, ..) chooses a folder's weights files. A file for another
    base model (SD2, SDXL, another width) or networks that do not fit together raise a ValueError naming what was
    found. -> Networks, frozen, in eval mode, in `dtype`, on the CPU"""
    controlnet_file = sd_checkpoints.model_folder(controlnet_file)
    builds = ARCHITECTURES[architecture] | sd_checkpoints.folder_builds(sd15_file, controlnet_file)
    with torch.device("meta"):
        networks = Networks(**{name: build() for name, build in builds.items()})
    check_fit(networks)
    try:
        sd_checkpoints.load_sd15(sd15_file, networks.unet, networks.autoencoder, networks.text_encoder,
                                 variant=variant)
    except ValueError as error:
        raise ValueError(f"SD1.5 file: {error}") from None
    try:
        sd_checkpoints.load(networks.controlnet, sd_checkpoints.weights_path(controlnet_file, variant))
    except ValueError as error:
        raise ValueError(f"ControlNet file: {error}") from None
    for network in networks:
        network.requires_grad_(False).eval().to(dtype)
    return networks


def check_fit(networks):
    """Networks built from configs must fit together: the ControlNet's encoder the UNet's (its residuals are the UNet's
    skips), the text encoder's width the UNet's context width, the VAE's latents the UNet's input."""
    unet = networks.unet
    problems = [f"{what} {theirs}, the UNet's {ours}" for what, theirs, ours in (
        ("the ControlNet's residuals (channels, downsampling)", networks.controlnet.residual_layout,
         unet.residual_layout),
        *((f"the ControlNet's {field}", networks.controlnet.encoder_config[field], unet.encoder_config[field])
          for field in ("in_channels", "context_dim")),
        ("the text encoder's width", networks.text_encoder.text_model.final_layer_norm.normalized_shape[0],
         unet.encoder_config["context_dim"]),
        ("the VAE's latent channels", networks.autoencoder.z_channels, unet.in_channels)) if theirs != ours]
    if problems:
        raise ValueError("the networks do not fit together: " + "; ".join(problems))


def latent_side(networks, image_size):
    """The latent side of an image_size x image_size image; a size the VAE and UNet cannot both divide raises."""
    factor = networks.autoencoder.downsampling_factor * 2 ** (networks.unet.num_levels - 1)
    if image_size <= 0 or image_size % factor:
        raise ValueError(f"the image size must be a positive multiple of {factor} (the VAE's downsampling times the "
                         f"UNet's), got {image_size}")
    return image_size // networks.autoencoder.downsampling_factor


def check_tokenizer(tokenizer, text_encoder):
    """A vocabulary whose ids do not all index the text encoder's token embedding raises."""
    vocab_size = text_encoder.text_model.embeddings.token_embedding.num_embeddings
    if max(tokenizer.ids.values()) >= vocab_size:
        raise ValueError(f"the vocabulary has ids up to {max(tokenizer.ids.values())}; the text encoder embeds "
                         f"{vocab_size} tokens (CLIP's bpe_simple_vocab_16e6.txt.gz or vocab.json + merges.txt "
                         f"expected)")


@torch.no_grad()
def generate(networks, context, null_context, hint, noise, steps=50, cfg_scale=7.5, control_scale=1.0,
             sampler="ddim"):
    """Images (B, 3, S, S) in [-1, 1] (float32, unclamped) from latent noise (B, 4, S/8, S/8): DDIM (eta 0) over the
    leading timesteps, the last step to abar_0 (set_alpha_to_one False), or UniPC (order 2, bh2) over the linspace
    timesteps, the last step to the x0 estimate; then the VAE decoder on latents / scale. null_context: CFG's
    unconditional branch, the empty prompt's or a negative prompt's context."""
    schedule = sd15_schedule()
    denoise = controlled_denoiser(networks.unet, networks.controlnet, context, null_context, hint, cfg_scale,
                                  control_scale)
    timesteps = sampling_timesteps(steps, sampler)
    if sampler == "unipc":
        latents = unipc(denoise, noise, schedule, timesteps)  # (B, 4, h, w)
    else:
        latents = ddim(denoise, noise, schedule, timesteps, final_abar=schedule.abar(0))
    autoencoder = networks.autoencoder
    dtype = next(autoencoder.parameters()).dtype
    return autoencoder.decode((latents / autoencoder.scaling_factor).to(dtype)).float()


# ---------------------------------------------------------------------------------------------------------------------
# Sampling a set of prompt / control pairs
# ---------------------------------------------------------------------------------------------------------------------

CONTROL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class PairSampling(NamedTuple):
    """How sd15_share samples the pairs (sample.py sd15's flags of the same names)."""
    size: int  # image side in pixels
    sampler: str  # ddim or unipc
    steps: int  # sampler steps
    cfg: float  # CFG weight, 1: off
    control_scale: float  # multiplies the ControlNet's residuals
    seeds_per_prompt: int
    seed: int  # sample i: seed + i
    batch_size: int  # per rank
    clip_skip: int = 0  # the prompts' context from the text encoder's layer depth - clip_skip (CLIPTextModel.forward)


def read_pairs(prompts_file, controls):
    """-> [(prompt, control image path)] from prompts_file (--prompts): a .txt of prompts, one a line, matched in
    order to the control images of the folder `controls` (--controls) sorted by name, or a .jsonl of {"prompt": ..,
    "control": PATH} lines, PATH relative to `controls` when given, else to the .jsonl's folder. Every control file
    must exist."""
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
    image = read_image(path)  # a file pillow cannot read: ValueError naming it
    if image.size != (size, size):
        if warn:
            print(f"warning: control {path} is {image.width}x{image.height}; resized to {size}x{size}",
                  file=sys.stderr)
        image = image.resize((size, size), Image.LANCZOS)
    return np.array(image)  # a writable copy, for torch.from_numpy


def file_hints(pairs, size):
    """hint(p) of read_pairs' pairs: control image p as read_control reads it -> (3, S, S) float32 in [0, 1]."""
    return lambda pair: torch.from_numpy(read_control(pairs[pair][1], size)).permute(2, 0, 1).float() / 255


def metadata_pairs(folder, task, size):
    """The pairs of a metadata.jsonl folder (ref/control_data.py): each line's caption and the hint its ControlNet
    reads, cut as ControlDataset cuts it for training (short side to `size`, central square): the grey map on three
    channels, or a segmentation line's colour-coded hint. -> ([(caption, hint path)], hint(p) -> (3, S, S) in [0, 1])"""
    dataset = ControlDataset(folder, task, size)
    pairs = [(entry.caption, entry.hint or entry.control) for entry in dataset.entries]
    return pairs, lambda pair: dataset[pair][1]


def hint_picture(hint):
    """(3, S, S) in [0, 1] -> (S, S, 3) uint8."""
    return (hint * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@torch.no_grad()
def sd15_share(settings, networks, hints, tokens, null_tokens, world):
    """This rank's samples r, r + W, ..: sample i follows pair i // seeds_per_prompt from latent noise seeded with
    seed + i; the prompts' context with settings.clip_skip, the empty prompt's from the last layer, as diffusers'
    encode_prompt applies clip_skip to the prompt only (pipeline_controlnet.py, encode_prompt: the negative prompt's
    embeddings are the text encoder's output [0]). settings: PairSampling (or an object with its fields); hints:
    hint(p) -> pair p's control (3, S, S) in [0, 1] (file_hints, metadata_pairs); tokens: (P, 77) of the prompts,
    null_tokens (1, 77) of the empty one.
    -> (indices, images (n, S, S, 3) uint8)"""
    num_samples = len(tokens) * settings.seeds_per_prompt
    side = latent_side(networks, settings.size)
    null_context = networks.text_encoder(null_tokens.to(world.device))  # (1, 77, D)
    indices = np.arange(world.rank, num_samples, world.world_size)
    outputs = [np.zeros((0, settings.size, settings.size, 3), np.uint8)]
    for start in range(0, len(indices), settings.batch_size):
        batch = indices[start:start + settings.batch_size]
        pair_indices = batch // settings.seeds_per_prompt
        hint = torch.stack([hints(int(p)) for p in pair_indices]).to(world.device)  # (n, 3, S, S) in [0, 1]
        context = networks.text_encoder(tokens[pair_indices].to(world.device), settings.clip_skip)  # (n, 77, D)
        noise = runtime.SampleDraws(settings.seed + int(i) for i in batch).randn(4, side, side).to(world.device)
        images = generate(networks, context, null_context, hint, noise, settings.steps, settings.cfg,
                          settings.control_scale, settings.sampler)
        outputs.append(to_uint8(images.cpu()))
    return indices, np.concatenate(outputs)


def sd15_grid_pictures(samples, hints, num_pairs, rows, seeds_per_prompt):
    """grid.png's first `rows` rows: each control, then its samples. -> (N', S, S, 3) uint8"""
    pictures = []
    for pair in range(min(num_pairs, rows)):
        first = pair * seeds_per_prompt
        pictures += [hint_picture(hints(pair)), *samples[first:first + seeds_per_prompt]]
    return np.stack(pictures)
