"""Text-to-image sampling with Stable Diffusion 1.5 steered by a ControlNet, from the released weights.

    prompts --tokenizer, CLIP text encoder--> context (B, 77, 768); the empty prompt's context is CFG's null
    noise (B, 4, S/8, S/8) --DDIM over SD's "leading" timesteps, eps = UNet(x, t, context, ControlNet residuals)-->
    latents --/ 0.18215, VAE decoder--> images (B, 3, S, S) in [-1, 1]

The sampler is SD1.5's scheduler as its scheduler_config sets diffusers' DDIMScheduler: 1000 training steps with
scaled_linear betas 0.00085 .. 0.012 (ref.schedules), timestep_spacing "leading" with steps_offset 1 (50 steps: 981,
961, .., 1; ref.samplers.leading_timesteps) and set_alpha_to_one False: the last step goes from t = 1 to abar_0, not
to the x0 estimate. eta 0. Classifier-free guidance (Ho & Salimans 2022) on the text, eps = eps_null + w (eps_text -
eps_null), with the control in both branches (lllyasviel/ControlNet's samplers; ControlNet++'s evaluation); the
ControlNet's residuals are multiplied by the control scale (ControlNet 1.1's "control strength"). The control image is
RGB in [0, 1] (the ControlNet releases feed the annotator's map / 255), at the image size, 8x the latent side.

The networks run in their own dtype; the DDIM state and the timesteps stay in float64 / float32 (a bf16 timestep would
round 981 to 980).
"""
import functools
from typing import NamedTuple

import torch

from ref import clip, controlnet, sd_checkpoints, unet, vae
from ref.guidance import cfg
from ref.samplers import ddim, leading_timesteps
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


def sampling_timesteps(steps):
    """SD1.5's DDIM timesteps for `steps` steps (leading spacing, steps_offset 1), descending. (steps,) int64"""
    return leading_timesteps(TRAINING_TIMESTEPS, steps, STEPS_OFFSET)


def load_networks(architecture, sd15_file, controlnet_file, dtype=torch.float32):
    """The four networks of `architecture`, built on the meta device and given the files' tensors: the UNet, VAE and
    text encoder from an SD1.5 single file, the ControlNet from a ControlNet 1.0 / 1.1 or diffusers file. A file for
    another base model (SD2, SDXL, another width) raises a ValueError naming what was found. -> Networks, frozen, in
    eval mode, in `dtype`, on the CPU"""
    with torch.device("meta"):
        networks = Networks(**{name: build() for name, build in ARCHITECTURES[architecture].items()})
    try:
        sd_checkpoints.load_sd15(sd15_file, networks.unet, networks.autoencoder, networks.text_encoder)
    except ValueError as error:
        raise ValueError(f"SD1.5 file: {error}") from None
    try:
        sd_checkpoints.load(networks.controlnet, controlnet_file)
    except ValueError as error:
        raise ValueError(f"ControlNet file: {error}") from None
    for network in networks:
        network.requires_grad_(False).eval().to(dtype)
    return networks


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


def controlled_denoiser(networks, context, null_context, hint, cfg_scale, control_scale):
    """denoise(x, t) -> eps for the sampler: the UNet steered by the ControlNet's residuals for `hint` (B, 3, S, S),
    each times control_scale; text `context` (B, L, D) guided against `null_context` (1, L, D) with weight cfg_scale
    (1: the text branch alone, one pass), the control in both branches. x is given to the networks in their dtype."""
    dtype = next(networks.unet.parameters()).dtype
    hint = hint.to(dtype)

    def eps(x, t, context, hint):
        residuals = networks.controlnet(x, hint, t, context, scales=control_scale)
        return networks.unet(x, t, context, control=residuals).float()

    def denoise(x, t):  # x (B, 4, h, w), t (B,) float32
        x = x.to(dtype)
        if cfg_scale == 1.0:
            return eps(x, t, context, hint)
        null = null_context.expand(len(x), -1, -1)
        cond, uncond = eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null]),
                           torch.cat([hint, hint])).chunk(2)
        return cfg(cond, uncond, cfg_scale)
    return denoise


@torch.no_grad()
def generate(networks, context, null_context, hint, noise, steps=50, cfg_scale=7.5, control_scale=1.0):
    """Images (B, 3, S, S) in [-1, 1] (float32, unclamped) from latent noise (B, 4, S/8, S/8): DDIM (eta 0) over the
    leading timesteps, the last step to abar_0 (set_alpha_to_one False), then the VAE decoder on latents / scale."""
    schedule = sd15_schedule()
    denoise = controlled_denoiser(networks, context, null_context, hint, cfg_scale, control_scale)
    latents = ddim(denoise, noise, schedule, sampling_timesteps(steps), final_abar=schedule.abar(0))  # (B, 4, h, w)
    autoencoder = networks.autoencoder
    dtype = next(autoencoder.parameters()).dtype
    return autoencoder.decode((latents / autoencoder.scaling_factor).to(dtype)).float()
