"""The Stable Diffusion UNet (Rombach et al. 2022, LDM), the denoiser InnerControl's ControlNet steers.

An ADM-style UNet (Dhariwal & Nichol 2021): ResBlocks conditioned on the timestep embedding, with spatial transformers
(self-attention, cross-attention over a context sequence, GEGLU feed-forward) at the chosen levels, stride-2 conv
downsampling, nearest + conv upsampling, and the encoder's outputs concatenated onto the decoder's inputs.

Layout (SD1.5: channel_mult (1, 2, 4, 4), 2 ResBlocks a level; "A" = spatial transformer; sizes for a 64x64 latent):
    input_blocks   0: conv in -> 320 @64 | 1-2: Res+A 320 @64 | 3: down | 4-5: Res+A 640 @32 | 6: down
                   7-8: Res+A 1280 @16 | 9: down | 10-11: Res 1280 @8                        (12 skips)
    middle_block   Res, A, Res 1280 @8
    output_blocks  0-2: Res 1280 @8 (2: + up) | 3-5: Res+A 1280 @16 (5: + up) | 6-8: Res+A 640 @32 (8: + up)
                   9-11: Res+A 320 @64; each block's ResBlock reads concat(h, skip)
    out            GroupNorm, SiLU, conv 320 -> out
State-dict keys follow the original LDM checkpoints (CompVis/stable-diffusion ldm/modules/diffusionmodules/
openaimodel.py and ldm/modules/attention.py), where they carry the prefix `model.diffusion_model.`; `load_checkpoint`
strips it, so SD1.5 weights load as they are.

Feature taps for the readout probes (InnerControl; Readout Guidance, Luo et al. 2024), in decoder order:
    "conv": every decoder ResBlock's hidden state after its second conv, before the skip add (SD1.5: 12 maps);
    "attn": the self-attention (attn1) output of the first transformer block of every decoder spatial transformer,
            as (B, C, H, W) (SD1.5: 9 maps: 3 x 1280 @16, 3 x 640 @32, 3 x 320 @64).
They are forward hooks, registered for one call of `forward(..., taps=mode)` and removed after it: no cost otherwise.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from ref.checkpoints import check_state_fits, read_checkpoint, unwrap_state


def zero_module(module):
    """Zero every parameter (the LDM init of each residual branch's last layer, and ControlNet's zero convs)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def run_block(block, checkpointing, *inputs):
    """block(*inputs); with checkpointing, and only while autograd records (training), through activation
    checkpointing: the block's inner activations are not kept for the backward pass but recomputed in it, trading one
    more forward of the block for their memory (torch.utils.checkpoint, non-reentrant, RNG state preserved)."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


# ---------------------------------------------------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------------------------------------------------

def timestep_embedding(t, dim, max_period=10000):
    """t (B,) -> (B, dim) sinusoids [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2)), i < dim/2.

    The order is LDM's `timestep_embedding` (ldm/modules/diffusionmodules/util.py): cosines first, then sines, with no
    frequency shift (diffusers reproduces it with flip_sin_to_cos=True, freq_shift=0). t is the integer DDPM step in
    [0, 1000), any float accepted."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, dim)


# ---------------------------------------------------------------------------------------------------------------------
# ResBlock, down- and upsampling
# ---------------------------------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; + Linear(SiLU(emb)) per channel; GroupNorm, SiLU, dropout, 3x3 conv (zero init);
    added to the input, through a 1x1 conv when the channel count changes. (B, C_in, H, W) -> (B, C_out, H, W).

    The "conv" tap reads the output of out_layers: after the second conv, before the skip add."""

    def __init__(self, channels, emb_channels, out_channels, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]  # timestep: one offset per channel
        h = self.out_layers(h)  # (B, C_out, H, W)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """3x3 conv with stride 2: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2x, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


# ---------------------------------------------------------------------------------------------------------------------
# Spatial transformer: self-attention, cross-attention over the context, GEGLU feed-forward
# ---------------------------------------------------------------------------------------------------------------------

class CrossAttention(nn.Module):
    """Multi-head attention of the tokens x (B, T, D) over a context (B, L, D_ctx); over x itself when context is
    None (attn1, the self-attention). q, k, v without bias, as in LDM; scaled by head_dim^-1/2."""

    def __init__(self, dim, num_heads, context_dim=None, dropout=0.0):
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, T, D), (B, L, D), (B, L, D)
        q, k, v = (z.unflatten(2, (self.num_heads, -1)).transpose(1, 2) for z in (q, k, v))  # (B, heads, T|L, D/h)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, D/heads)
        return self.to_out(attended.transpose(1, 2).flatten(2))  # (B, T, D)


class GEGLU(nn.Module):
    """One Linear to 2 x hidden, split into value and gate: value * GELU(gate) (Shazeer 2020)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, T, hidden)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4 x dim, dropout, Linear back to dim (keys net.0.proj, net.2)."""

    def __init__(self, dim, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention over the context, feed-forward; each residual.
    The "attn" tap reads the output of attn1 (before its residual add)."""

    def __init__(self, dim, num_heads, context_dim, dropout=0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, num_heads, dropout=dropout)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, num_heads, context_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))  # (B, T, D)
        x = x + self.attn2(self.norm2(x), context)  # (B, T, D)
        return x + self.ff(self.norm3(x))  # (B, T, D)


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv proj_in, the H*W positions as tokens through one transformer block, 1x1 conv proj_out (zero
    init), added to the input. (B, C, H, W), context (B, L, D_ctx) -> (B, C, H, W).

    LDM allows several blocks (transformer_depth); SD1.5 has one, kept in a list for the key names."""

    def __init__(self, channels, num_heads, context_dim, dropout=0.0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} attention heads")
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, num_heads, context_dim, dropout)])
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x, context):
        height, width = x.shape[-2:]
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)  # (B, HW, C)
        return x + self.proj_out(tokens.transpose(1, 2).unflatten(2, (height, width)))  # (B, C, H, W)


class UNetBlock(nn.Sequential):
    """One entry of input_blocks / output_blocks / middle_block (LDM's TimestepEmbedSequential): ResBlocks also get
    the timestep embedding, spatial transformers the context, everything else x alone."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------------------------------
# Encoder (shared with the ControlNet's trainable copy) and the full UNet
# ---------------------------------------------------------------------------------------------------------------------

class UNetEncoder(nn.Module):
    """time_embed, input_blocks and middle_block: the part of the UNet that ControlNet copies.

    model_channels: C, the width of level 0; level l has channel_mult[l] * C channels and runs at 1/2^l resolution.
    num_res_blocks: ResBlocks a level in the encoder (the decoder has one more, reading the Downsample's skip).
    attention_levels: levels whose ResBlocks are followed by a spatial transformer (SD1.5: 0, 1, 2 = LDM's
        attention_resolutions 1, 2, 4); the middle block always has one.
    num_heads: heads of every attention layer (SD1.5: 8 at every level, head widths 40, 80, 160).
    context_dim: width of the cross-attention context tokens (SD1.5: 768, CLIP ViT-L/14 text tokens).
    gradient_checkpointing: run every input, middle and output block through activation checkpointing when
        training (see run_block); the outputs and gradients are the same, the memory of their activations is not.
    """

    def __init__(self, in_channels, model_channels, channel_mult, num_res_blocks, attention_levels, num_heads,
                 context_dim, dropout=0.0, gradient_checkpointing=False):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        if model_channels % 32:
            raise ValueError(f"model_channels must be a multiple of 32 (GroupNorm, 32 groups), got {model_channels}")
        self.encoder_config = dict(in_channels=in_channels, model_channels=model_channels,
                                   channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                                   attention_levels=tuple(attention_levels), num_heads=num_heads,
                                   context_dim=context_dim, dropout=dropout)
        self.in_channels, self.model_channels = in_channels, model_channels
        self.num_levels = len(channel_mult)
        self.emb_channels = emb_channels = 4 * model_channels  # width of the timestep embedding (embed_time)
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

        def res_block(channels, out_channels):
            return ResBlock(channels, emb_channels, out_channels, dropout)

        def transformer(channels):
            return SpatialTransformer(channels, num_heads, context_dim, dropout)

        # residual_layout: (channels, downsampling factor) of every encoder output the decoder reads, in order: the
        # input blocks' skips, then the middle block. A ControlNet returns one residual of each.
        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        self.residual_layout = [(model_channels, 1)]
        channels = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(channels, mult * model_channels)]
                channels = mult * model_channels
                if level in attention_levels:
                    layers.append(transformer(channels))
                self.input_blocks.append(UNetBlock(*layers))
                self.residual_layout.append((channels, 2 ** level))
            if level < self.num_levels - 1:
                self.input_blocks.append(UNetBlock(Downsample(channels)))
                self.residual_layout.append((channels, 2 ** (level + 1)))
        self.middle_block = UNetBlock(
            res_block(channels, channels), transformer(channels), res_block(channels, channels))
        self.residual_layout.append((channels, 2 ** (self.num_levels - 1)))

    def embed_time(self, t):
        """t (B,) -> emb (B, 4C): the sinusoids through the time_embed MLP; every ResBlock reads it."""
        return self.time_embed(timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype))

    def check_input(self, x):
        factor = 2 ** (self.num_levels - 1)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"input must be (B, {self.in_channels}, H, W) with H and W multiples of {factor}, "
                             f"got {tuple(x.shape)}")

    def residual_shapes(self, height, width):
        """(C, H, W) of every encoder output (skips, then the middle block) for an (H, W) input."""
        return [(channels, height // factor, width // factor) for channels, factor in self.residual_layout]

    def encode(self, x, emb, context, hint=None):
        """x (B, C_in, H, W) -> (middle block output, [the skip after every input block]).
        hint: (B, C, H, W) added to the output of the first conv (the ControlNet's encoded control)."""
        h = run_block(self.input_blocks[0], self.gradient_checkpointing, x, emb, context)  # (B, C, H, W)
        if hint is not None:
            h = h + hint
        skips = [h]
        for block in self.input_blocks[1:]:
            h = run_block(block, self.gradient_checkpointing, h, emb, context)
            skips.append(h)
        return run_block(self.middle_block, self.gradient_checkpointing, h, emb, context), skips


TAP_MODES = ("conv", "attn")


class UNet(UNetEncoder):
    """The SD-style UNet: eps (or whatever it is trained for) from x (B, C_in, H, W), t (B,), context (B, L, D_ctx).

    out_channels: defaults to in_channels. Parameters of UNetEncoder otherwise.
    """
    checkpoint_prefix = "model.diffusion_model."  # where the original LDM checkpoints keep the UNet

    def __init__(self, in_channels, model_channels, channel_mult, num_res_blocks, attention_levels, num_heads,
                 context_dim, dropout=0.0, out_channels=None, gradient_checkpointing=False):
        super().__init__(in_channels, model_channels, channel_mult, num_res_blocks, attention_levels, num_heads,
                         context_dim, dropout, gradient_checkpointing)
        self.out_channels = in_channels if out_channels is None else out_channels
        emb_channels = 4 * model_channels
        skip_channels = [channels for channels, _ in self.residual_layout[:-1]]
        channels = self.residual_layout[-1][0]
        self.output_blocks = nn.ModuleList()
        self.output_block_factors = []  # downsampling factor of each output block's ResBlock and transformer
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks + 1):
                layers = [ResBlock(channels + skip_channels.pop(), emb_channels, mult * model_channels, dropout)]
                channels = mult * model_channels
                if level in attention_levels:
                    layers.append(SpatialTransformer(channels, num_heads, context_dim, dropout))
                if level > 0 and index == num_res_blocks:
                    layers.append(Upsample(channels))
                self.output_blocks.append(UNetBlock(*layers))
                self.output_block_factors.append(2 ** level)
        self.out = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), zero_module(nn.Conv2d(channels, self.out_channels, 3, padding=1)))

    def tap_points(self, mode):
        """(module whose output is tapped, downsampling factor) of every feature map of a tap mode, decoder order."""
        if mode not in TAP_MODES:
            raise ValueError(f"unknown tap mode {mode!r}: expected one of {TAP_MODES}")
        points = []
        for block, factor in zip(self.output_blocks, self.output_block_factors):
            for layer in block:
                if mode == "conv" and isinstance(layer, ResBlock):
                    points.append((layer.out_layers, factor))
                elif mode == "attn" and isinstance(layer, SpatialTransformer):
                    points.append((layer.transformer_blocks[0].attn1, factor))
        return points

    def tap_channels(self, mode):
        """C_l of every feature map of a tap mode, decoder order: what a probe on them is built for."""
        return [module[-1].out_channels if mode == "conv" else module.to_out[0].out_features
                for module, _ in self.tap_points(mode)]

    def check_control(self, control, height, width):
        expected = self.residual_shapes(height, width)
        got = [tuple(residual.shape[1:]) for residual in control]
        if got != expected:
            raise ValueError(f"control residuals must be {len(expected)} maps (C, H, W) = {expected} for an "
                             f"{height}x{width} input, got {len(got)}: {got}")

    def denoise(self, x, t, context, control):
        """The UNet pass; with control, ControlNet's injection (ControlledUnetModel of lllyasviel/ControlNet cldm.py):
        the middle output gets control[-1], and each decoder block reads concat(h, skip + control residual)."""
        self.check_input(x)
        emb = self.embed_time(t)  # (B, 4C)
        h, skips = self.encode(x, emb, context)
        if control is not None:
            self.check_control(control, *x.shape[2:])
            h = h + control[-1]
            skips = [skip + residual for skip, residual in zip(skips, control[:-1])]
        for block in self.output_blocks:
            h = run_block(block, self.gradient_checkpointing, torch.cat([h, skips.pop()], dim=1), emb,
                          context)  # (B, C_l, H_l, W_l)
        return self.out(h)  # (B, C_out, H, W)

    def forward(self, x, t, context, control=None, taps=None):
        """x (B, C_in, H, W), t (B,), context (B, L, D_ctx) -> (B, C_out, H, W).

        control: the ControlNet's residuals (one per skip, then the middle one; see residual_shapes), or None.
        taps: None, or "conv" / "attn": then returns (output, features), features a list of (B, C_l, H_l, W_l) in
            decoder order (see tap_points). The hooks live for this call only."""
        if taps is None:
            return self.denoise(x, t, context, control)
        height, width = x.shape[2:]
        features = []

        def record(factor):
            def hook(module, inputs, output):
                if output.dim() == 3:  # attention tokens (B, HW, C) -> (B, C, H, W)
                    output = output.transpose(1, 2).unflatten(2, (height // factor, width // factor))
                features.append(output)
            return hook

        handles = [module.register_forward_hook(record(factor)) for module, factor in self.tap_points(taps)]
        try:
            out = self.denoise(x, t, context, control)
        finally:
            for handle in handles:
                handle.remove()
        return out, features


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

CONFIGS = {
    # pixel space, small RGB images (the shapes testbed: 16 px): two levels, attention on the second
    "tiny": dict(in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                 num_heads=2, context_dim=32),
    # SD1.5 (v1-inference.yaml; lllyasviel/ControlNet models/cldm_v15.yaml): 4-channel latents of the 8x VAE
    "sd15": dict(in_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                 attention_levels=(0, 1, 2), num_heads=8, context_dim=768),
}

MODELS = {name: functools.partial(UNet, **config) for name, config in CONFIGS.items()}  # keywords override


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def select_state(checkpoint, prefix, prefer="ema"):
    """The state dict of one network out of a checkpoint dict: a raw state dict, an LDM / Lightning file
    {"state_dict": ...}, or a train.py checkpoint {"ema": ..., "model": ...} (`prefer` picks, falling back to the
    other). When keys carry `prefix` (e.g. model.diffusion_model. in an SD .ckpt, control_model. in a ControlNet
    file), only those are this network's, with the prefix stripped; the rest belong to the file's other networks.
    -> {our key: tensor}, {our key: the key in the file}."""
    state, original = unwrap_state(checkpoint, prefer)
    if any(key.startswith(prefix) for key in state):
        original = {key[len(prefix):]: original[key] for key in state if key.startswith(prefix)}
        state = {key: state[prefix + key] for key in original}
    return state, original


def load_checkpoint(model, checkpoint, prefer="ema"):
    """Load a UNet or ControlNet checkpoint into `model` (which names its prefix in `checkpoint_prefix`), all or
    nothing.

    checkpoint: a path or a dict (see select_state). Missing keys, unexpected keys and shape mismatches raise a
    ValueError naming each of them, before anything is copied. A model built on the meta device takes the file's
    tensors as they are (no random init of SD1.5's 860M parameters first)."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    state, original = select_state(checkpoint, model.checkpoint_prefix, prefer)
    check_state_fits(model, state, original)
    on_meta = any(parameter.is_meta for parameter in model.parameters())
    model.load_state_dict(state, assign=on_meta)
    return model
