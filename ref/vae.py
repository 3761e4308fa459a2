"""The KL autoencoder of latent diffusion (Rombach et al. 2022, `AutoencoderKL`): images <-> latents.

Encoder: conv_in; per level, ResNet blocks (+ single-head attention at the chosen levels) and, but for the last level,
a 2x downsample; mid block (ResNet, attention over all H*W positions, ResNet); GroupNorm, SiLU, conv_out to
2 * z channels; quant_conv (1x1) -> the moments (mean, logvar) of a diagonal Gaussian posterior.
Decoder: post_quant_conv (1x1); conv_in; mid block; levels from the deepest up, each num_res_blocks + 1 ResNet blocks
and, but for level 0, a nearest 2x upsample + conv; GroupNorm, SiLU, conv_out to RGB. No timestep input anywhere.

Presets (`MODELS`):
    sd            sd-vae-ft-ema / sd-vae-ft-mse / SD1.x: ch 128, ch_mult (1, 2, 4, 4), f8, z 4, latents x 0.18215
    vavae-f16d32  VA-VAE (Yao et al. 2025), LightningDiT's tokenizer: ch_mult (1, 1, 2, 2, 4), f16, z 32, attention
                  in the deepest level of encoder and decoder (the release's attn_resolutions [16] at resolution 256);
                  LightningDiT normalises its latents per channel with a statistics file, not by a scale (1.0 here)
    tiny          for tests
Key layouts: the native one is LDM's (CompVis latent-diffusion ldm/modules/diffusionmodules/model.py; the VA-VAE
release and SD1.x checkpoints under `first_stage_model.`); `diffusers_key` maps it to the diffusers layout
(`diffusers.AutoencoderKL`, how sd-vae-ft-* are published), whose attention projections are Linear, not 1x1 convs.
"""
import functools
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.checkpoints import check_state_fits
from ref.unet import Upsample, run_block  # Upsample: nearest 2x + 3x3 conv, the same in the LDM UNet and autoencoder


def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), x through a 1x1 conv (nin_shortcut) when the channel count
    changes. (B, C_in, H, W) -> (B, C_out, H, W)"""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """x + proj_out(softmax(q^T k / sqrt(C)) v): one head over the H*W positions, q, k, v 1x1 convs of norm(x).
    (B, C, H, W) -> (B, C, H, W)"""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(b, 1, c, height * width).transpose(2, 3) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C), scale 1/sqrt(C)
        return x + self.proj_out(h.transpose(2, 3).reshape(b, c, height, width))


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 conv (LDM's asymmetric padding).
    (B, C, H, W) -> (B, C, H/2, W/2)"""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution: ResNet blocks `block`, each followed by its `attn` block when `attention`, then the
    `downsample` or `upsample` named by `resample` (None: neither). (B, C_in, H, W) -> (B, C_out, H', W')
    checkpointing: each of those blocks through activation checkpointing when training (ref.unet.run_block)."""

    def __init__(self, in_channels, out_channels, num_blocks, attention, resample=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels)
                                   for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks if attention else 0))
        self.resample = resample
        if resample is not None:
            self.add_module(resample, {"downsample": Downsample, "upsample": Upsample}[resample](out_channels))

    def forward(self, h, checkpointing=False):
        for i, block in enumerate(self.block):
            h = run_block(block, checkpointing, h)
            if self.attn:
                h = run_block(self.attn[i], checkpointing, h)
        return run_block(getattr(self, self.resample), checkpointing, h) if self.resample else h


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution. (B, C, H, W) -> (B, C, H, W)"""

    def __init__(self, channels):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


# ---------------------------------------------------------------------------------------------------------------------
# Encoder, decoder, autoencoder
# ---------------------------------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * z_channels, H / f, W / f), f = 2^(len(ch_mult) - 1)"""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, attn_levels, in_channels):
        super().__init__()
        widths = [ch * mult for mult in ch_mult]
        last = len(ch_mult) - 1
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(([ch] + widths)[i], widths[i], num_res_blocks, i in attn_levels, None if i == last else "downsample")
            for i in range(len(ch_mult)))
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, ch * ch_mult[-1], H / f, W / f)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h * f, w * f). `up[i]` is level i, as in LDM; they run from the last
    (deepest) to 0. gradient_checkpointing: the mid block and every block of every level through activation
    checkpointing when training (ref.unet.run_block); outputs and gradients unchanged."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, attn_levels, out_channels,
                 gradient_checkpointing=False):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        widths = [ch * mult for mult in ch_mult]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        self.up = nn.ModuleList(
            Level((widths + [widths[-1]])[i + 1], widths[i], num_res_blocks + 1, i in attn_levels,
                  None if i == 0 else "upsample")
            for i in range(len(ch_mult)))
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z):
        h = run_block(self.mid, self.gradient_checkpointing, self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, h * f, w * f)


def in_slices(function, x, slice_size):
    """function applied to x[i:i + slice_size] in turn and concatenated (all at once when slice_size is None)."""
    if slice_size is None or len(x) <= slice_size:
        return function(x)
    return torch.cat([function(part) for part in x.split(slice_size)])


class AutoencoderKL(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) <-> latents (B, z_channels, H / f, W / f).

    encode -> (mean, logvar) of the posterior; sample draws from it; decode maps a latent back to an image.
    `scaling_factor` is the constant a diffusion model's latents are multiplied by (z * scale, decoded as z / scale);
    the scripts apply it, not this module. `slice_size` runs a large batch through in slices of that many images.
    gradient_checkpointing: the decoder's blocks through activation checkpointing when training (see Decoder)."""

    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, attn_levels=(), scaling_factor=1.0, image_channels=3,
                 gradient_checkpointing=False):
        super().__init__()
        self.z_channels = z_channels
        self.downsampling_factor = 2 ** (len(ch_mult) - 1)
        self.scaling_factor = scaling_factor
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, attn_levels, image_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, attn_levels, image_channels,
                               gradient_checkpointing)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def moments(self, x):
        """(B, 3, H, W) -> mean, logvar (B, z, H / f, W / f); logvar clamped to [-30, 20] as LDM's
        DiagonalGaussianDistribution."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x, slice_size=None):
        """(B, 3, H, W) -> (mean, logvar), each (B, z, H / f, W / f)."""
        return in_slices(lambda part: torch.cat(self.moments(part), dim=1), x, slice_size).chunk(2, dim=1)

    @staticmethod
    def posterior_sample(mean, logvar, draws):
        """One latent a row, z = mean + exp(logvar / 2) * eps, row i's eps from draws' generator i
        (ref.runtime.SampleDraws, or anything with its randn_like): the same for a sample in any batch. (B, z, h, w)"""
        return mean + torch.exp(0.5 * logvar) * draws.randn_like(mean)

    @staticmethod
    def sample(mean, logvar, generator=None):
        """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) drawn from `generator` (on mean's device)."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z, slice_size=None):
        """(B, z, h, w) -> (B, 3, h * f, w * f)"""
        return in_slices(lambda part: self.decoder(self.post_quant_conv(part)), z, slice_size)

    def forward(self, x, generator=None):
        """Reconstruction through a posterior sample."""
        return self.decode(self.sample(*self.encode(x), generator=generator))


MODELS = {
    "sd": functools.partial(AutoencoderKL, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4,
                            scaling_factor=0.18215),
    "vavae-f16d32": functools.partial(AutoencoderKL, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32,
                                      attn_levels=(4,)),
    "tiny": functools.partial(AutoencoderKL, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4,
                              attn_levels=(2,)),
}


# ---------------------------------------------------------------------------------------------------------------------
# Key layouts and loading
# ---------------------------------------------------------------------------------------------------------------------

ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14
TRAINING_ONLY_PREFIXES = ("loss.", "foundation_model.", "linear_proj.", "model_ema.")  # LDM / VA-VAE training state
LDM_PREFIX = "first_stage_model."  # the VAE inside an SD1.x checkpoint


def diffusers_key(ldm_key, num_levels):
    """The diffusers name of an LDM-layout key: down.i / up.i -> down_blocks.i / up_blocks.(num_levels - 1 - i)
    (diffusers orders the decoder's levels as they run), block -> resnets, attn -> attentions, mid.block_1/attn_1/
    block_2 -> mid_block.resnets.0/attentions.0/resnets.1, (down|up)sample -> (down|up)samplers.0, nin_shortcut ->
    conv_shortcut, norm_out -> conv_norm_out, attention norm/q/k/v/proj_out -> group_norm/to_q/to_k/to_v/to_out.0."""
    key = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", ldm_key)
    key = re.sub(r"\.mid\.block_([12])\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    key = key.replace(".mid.attn_1.", ".mid_block.attentions.0.")
    key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.", key)
    key = re.sub(r"_blocks\.(\d+)\.block\.", r"_blocks.\1.resnets.", key)
    key = re.sub(r"_blocks\.(\d+)\.attn\.", r"_blocks.\1.attentions.", key)
    key = re.sub(r"\.(down|up)sample\.conv\.", r".\1samplers.0.conv.", key)
    key = key.replace(".nin_shortcut.", ".conv_shortcut.")
    return re.sub(r"(attentions\.\d+)\.(norm|q|k|v|proj_out)\.", lambda m: f"{m[1]}.{ATTENTION_NAMES[m[2]]}.", key)


def is_attention_projection(key):
    """An attention q/k/v/out weight: a 1x1 conv (C, C, 1, 1) in LDM, a Linear (C, C) in diffusers."""
    return re.search(r"(attn(_1|\.\d+)\.(q|k|v|proj_out)|attentions\.\d+\.(to_q|to_k|to_v|to_out\.0))\.weight$",
                     key) is not None


def to_diffusers(state, num_levels):
    """An LDM-layout state dict in the diffusers layout (attention projection weights squeezed to (C, C))."""
    return {diffusers_key(key, num_levels): value[:, :, 0, 0] if is_attention_projection(key) else value
            for key, value in state.items()}


def from_diffusers(state, model):
    """A diffusers-layout state dict in `model`'s LDM layout (legacy attention names query/key/value/proj_attn
    accepted; projection weights unsqueezed to 1x1 convs). Keys with no LDM counterpart stay as they are.
    -> {LDM key: tensor}, {LDM key: the key in `state`}"""
    num_levels = len(model.encoder.down)
    ldm_key = {diffusers_key(key, num_levels): key for key in model.state_dict()}
    converted, original = {}, {}
    for key, value in state.items():
        modern = re.sub(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.",
                        lambda m: f"{m[1]}.{LEGACY_ATTENTION_NAMES[m[2]]}.", key)
        native = ldm_key.get(modern, key)
        converted[native] = value[:, :, None, None] if is_attention_projection(modern) and value.ndim == 2 else value
        original[native] = key
    return converted, original


def native_state(model, state):
    """The LDM-layout state dict for `model` from a VAE state dict in any layout it is published in: LDM (the VA-VAE
    release, with its training-only keys dropped), inside an SD1.x checkpoint (`first_stage_model.`), or diffusers.
    -> {key: tensor}, {key: the key in the file}"""
    if any(key.startswith(LDM_PREFIX) for key in state):
        state = {key[len(LDM_PREFIX):]: value for key, value in state.items() if key.startswith(LDM_PREFIX)}
        prefix = LDM_PREFIX
    else:
        prefix = ""
    state = {key: value for key, value in state.items() if not key.startswith(TRAINING_ONLY_PREFIXES)}
    if any(re.search(r"(down_blocks|up_blocks|mid_block)\.", key) for key in state):
        return from_diffusers(state, model)
    return state, {key: prefix + key for key in state}


def load_state(model, state):
    """Load a VAE state dict in any supported layout into `model`, after checking that it fits (a ValueError naming
    every missing, unexpected and mismatched key otherwise). A model on the meta device takes the file's tensors as
    they are. -> model"""
    native, original = native_state(model, state)
    check_state_fits(model, native, original)
    model.load_state_dict(native, assign=any(parameter.is_meta for parameter in model.parameters()))
    return model
