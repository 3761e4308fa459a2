"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the UNet's encoder steering the frozen UNet.

    hint (B, 3, f H, f W) --input_hint_block--> (B, C, H, W), added to the copy's first conv output
    copy of time_embed, input_blocks, middle_block (initialised from the UNet, `from_unet`)
    one zero-initialised 1x1 conv per encoder skip (zero_convs.N.0) and one after the middle block (middle_block_out.0)
    -> residuals [skip_0 .. skip_{n-1}, middle], each times its control scale (default 1.0)
The UNet takes them as `unet(x, t, context, control=residuals)`: middle output += residuals[-1], decoder block k reads
concat(h, skip + residual) (ref/unet.py, UNet.denoise). The zero convs make the controlled UNet equal the plain one at
initialisation.

Hint encoder (lllyasviel/ControlNet cldm/cldm.py, ControlNet.input_hint_block): 3x3 convs with SiLU between, channels
3 -> 16 -> 16 -> 32 -> 32 -> 96 -> 96 -> 256, then a zero-initialised 3x3 conv 256 -> C. In SD1.5 the 3rd, 5th and 7th
convs have stride 2: a 512x512 control lands on the 64x64 latent (hint_downsampling 8). A UNet in pixel space (the
tiny preset) needs hint_downsampling 1: the same convs, all with stride 1, so keys and parameter count do not change;
2 and 4 keep the first one or two stride-2 convs.

State-dict keys follow the ControlNet 1.0 / 1.1 checkpoints, where they carry the prefix `control_model.`
(`control_model.input_hint_block.0.weight`, `control_model.zero_convs.0.0.weight`, `control_model.middle_block_out.0.
weight`, `control_model.input_blocks...`, `control_model.time_embed...`); ref.unet.load_checkpoint strips it.
"""
import functools
import math

import torch
import torch.nn as nn

from ref.unet import CONFIGS, UNetEncoder, zero_module

HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)  # output channels of the hint encoder's convs before the last one
HINT_STRIDED = (2, 4, 6)  # which of them have stride 2 in SD1.5, in the order they are kept for smaller factors


def hint_encoder(hint_channels, model_channels, hint_downsampling):
    """(B, hint_channels, f H, f W) -> (B, model_channels, H, W); convs at the even indices 0 .. 14, SiLU between."""
    strided = HINT_STRIDED[:int(math.log2(hint_downsampling))]
    layers = []
    channels = hint_channels
    for index, width in enumerate(HINT_WIDTHS):
        layers += [nn.Conv2d(channels, width, 3, stride=2 if index in strided else 1, padding=1), nn.SiLU()]
        channels = width
    layers.append(zero_module(nn.Conv2d(channels, model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def zero_conv(channels):
    """A zero-initialised 1x1 conv, wrapped as the checkpoints name it (zero_convs.N.0, middle_block_out.0)."""
    return nn.Sequential(zero_module(nn.Conv2d(channels, channels, 1)))


class ControlNet(UNetEncoder):
    """ControlNet for a UNet of the same encoder configuration (see UNetEncoder for its parameters).

    hint_channels: channels of the control image (3).
    hint_downsampling: control resolution / UNet input resolution: 8 for SD1.5's latents, 1 for a pixel-space UNet;
        one of 1, 2, 4, 8.
    gradient_checkpointing: the encoder copy's blocks through activation checkpointing when training (UNetEncoder).
    """
    checkpoint_prefix = "control_model."

    def __init__(self, in_channels, model_channels, channel_mult, num_res_blocks, attention_levels, num_heads,
                 context_dim, dropout=0.0, hint_channels=3, hint_downsampling=8, gradient_checkpointing=False):
        super().__init__(in_channels, model_channels, channel_mult, num_res_blocks, attention_levels, num_heads,
                         context_dim, dropout, gradient_checkpointing)
        if hint_downsampling not in (1, 2, 4, 8):
            raise ValueError(f"hint_downsampling must be 1, 2, 4 or 8, got {hint_downsampling}")
        self.hint_channels, self.hint_downsampling = hint_channels, hint_downsampling
        self.input_hint_block = hint_encoder(hint_channels, model_channels, hint_downsampling)
        self.zero_convs = nn.ModuleList(zero_conv(channels) for channels, _ in self.residual_layout[:-1])
        self.middle_block_out = zero_conv(self.residual_layout[-1][0])

    @classmethod
    def from_unet(cls, unet, hint_channels=3, hint_downsampling=8, gradient_checkpointing=False):
        """A ControlNet whose encoder copy starts as the UNet's (time_embed, input_blocks, middle_block), on the
        UNet's device and in its dtype; the hint encoder's last conv and the zero convs start at zero."""
        reference = next(unet.parameters())
        with reference.device:
            controlnet = cls(**unet.encoder_config, hint_channels=hint_channels, hint_downsampling=hint_downsampling,
                             gradient_checkpointing=gradient_checkpointing)
        controlnet.to(reference.dtype)
        encoder_state = {key: value for key, value in unet.state_dict().items()
                         if key.startswith(("time_embed.", "input_blocks.", "middle_block."))}
        controlnet.load_state_dict(encoder_state, strict=False)  # the rest is the ControlNet's own (zero) layers
        return controlnet

    def check_hint(self, hint, x):
        batch, _, height, width = x.shape
        expected = (batch, self.hint_channels, self.hint_downsampling * height, self.hint_downsampling * width)
        if tuple(hint.shape) != expected:
            raise ValueError(f"control must be (B, C, H, W) = {expected} for an input of shape {tuple(x.shape)} "
                             f"(hint downsampling {self.hint_downsampling}), got {tuple(hint.shape)}")

    def forward(self, x, hint, t, context, scales=1.0):
        """x (B, C_in, H, W) noisy input, hint (B, hint_channels, f H, f W) control image, t (B,), context
        (B, L, D_ctx) -> the residuals, one (B, C_k, H_k, W_k) per encoder skip and the last for the middle block.

        scales: one number for all residuals (a float, a numpy number, a 0-d array or tensor) or one per residual
            (ControlNet 1.1's control_scales: a list, a 1-d array or tensor)."""
        self.check_input(x)
        self.check_hint(hint, x)
        emb = self.embed_time(t)  # (B, 4C)
        h, skips = self.encode(x, emb, context, hint=self.input_hint_block(hint))
        residuals = [conv(skip) for conv, skip in zip(self.zero_convs, skips)] + [self.middle_block_out(h)]
        one = not isinstance(scales, (list, tuple)) and getattr(scales, "ndim", 0) == 0
        scales = [scales] * len(residuals) if one else list(scales)
        if len(scales) != len(residuals):
            raise ValueError(f"control scales must be one number or {len(residuals)} of them, got {len(scales)}")
        return [residual * torch.as_tensor(scale, dtype=residual.dtype, device=residual.device)
                for scale, residual in zip(scales, residuals)]


# ---------------------------------------------------------------------------------------------------------------------
# Presets: the UNet presets of ref.unet with the hint downsampling that maps the control onto the UNet's input
# ---------------------------------------------------------------------------------------------------------------------

HINT_DOWNSAMPLING = {"tiny": 1, "sd15": 8}

MODELS = {name: functools.partial(ControlNet, **CONFIGS[name], hint_downsampling=factor)
          for name, factor in HINT_DOWNSAMPLING.items()}
