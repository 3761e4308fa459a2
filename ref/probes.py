"""Readout probe H(features, t): the lightweight control estimator of InnerControl (Eq. 7).

The architecture is the aggregation network of Readout Guidance (Luo et al. 2024), after Diffusion Hyperfeatures:
  1. every feature map f_l (B, C_l, H_l, W_l) is bilinearly resized to one resolution R (the latent size; 2x for thin
     edges in the paper);
  2. one bottleneck block per map brings it to P channels (P = 384), conditioned on the UNet's own embedding of t;
  3. learned mixing weights, one scalar per map, softmax-normalised:  out = sum_l softmax(w)_l * bottleneck_l(f_l);
  4. an output head: 3x3 conv P -> 128, SiLU, 3x3 conv 128 -> 32, SiLU, [transposed conv 2x up, SiLU], 1x1 conv
     32 -> C_out, then tanh.

Output: "tanh" gives a control in [-1, 1] (depth, edges; `ref.innercontrol.alignment_loss` reads it as the control's
[0, 1] through (H + 1) / 2, as the InnerControl release does); "logits" gives unbounded class scores (C_out = number of
classes) for segmentation, compared with class indices by cross-entropy, since a tanh would cap the logits in [-1, 1]
and so the softmax confidence.

The probe takes plain tensors, so it does not depend on which UNet produced the features; it is trained as a
train.py run (the testbed's ProbeRun, shapes/runs.py), and a probe run used on another UNet (other feature channels)
is refused with both channel lists named (check_probe_fits there).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

OUTPUTS = ("tanh", "logits")


def group_norm(channels, max_groups=32):
    """GroupNorm with 32 groups as detectron2's "GN" (Readout Guidance's bottlenecks), fewer when the channel count
    is not a multiple of 32 (the tiny probes of the tests): the largest divisor of `channels` up to 32."""
    return nn.GroupNorm(math.gcd(max_groups, channels), channels)


# ---------------------------------------------------------------------------------------------------------------------
# Bottleneck block with timestep conditioning (one per feature map)
# ---------------------------------------------------------------------------------------------------------------------

class TimestepBottleneck(nn.Module):
    """ResNet bottleneck C_in -> P/4 -> P/4 -> P with the timestep added after the first conv; GroupNorm after each
    conv (the shortcut's included). (B, C_in, R, R), (B, D_t) -> (B, P, R, R)."""

    def __init__(self, in_channels, out_channels, t_emb_dim):
        super().__init__()
        bottleneck_channels = out_channels // 4
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=False)
        self.norm1 = group_norm(bottleneck_channels)
        self.timestep_projection = nn.Linear(t_emb_dim, bottleneck_channels)
        self.conv2 = nn.Conv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = group_norm(bottleneck_channels)
        self.conv3 = nn.Conv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False)
        self.norm3 = group_norm(out_channels)
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                                          group_norm(out_channels))

    def forward(self, x, t_emb):
        h = F.relu(self.norm1(self.conv1(x)))  # (B, P/4, R, R)
        h = h + F.relu(self.timestep_projection(t_emb))[:, :, None, None]  # broadcast over R x R
        h = F.relu(self.norm2(self.conv2(h)))  # (B, P/4, R, R)
        h = self.norm3(self.conv3(h))  # (B, P, R, R)
        return F.relu(h + self.shortcut(x))  # (B, P, R, R)


# ---------------------------------------------------------------------------------------------------------------------
# The aggregation network H(features, t)
# ---------------------------------------------------------------------------------------------------------------------

class ReadoutProbe(nn.Module):
    """H(features, t) -> control estimate.

    feature_channels: C_l of each feature map, in the order the UNet taps them (SD1.5 `attn` mode: 3 x 1280, 3 x 640,
        3 x 320; `conv` mode: 12 maps).
    t_emb_dim: width D_t of the UNet's timestep embedding, which the caller passes in (the probe has no embedder).
    out_channels: C_out (1 for depth and edges; the number of classes for segmentation with output="logits").
    resolution: R, or (H, W), the size every map is resized to; the output has this size, twice it with `upsample`.
    projection_channels: P, the common width after the bottlenecks (384 in Readout Guidance).
    output: "tanh" (in [-1, 1]) or "logits" (segmentation), see the module docstring.
    upsample: a 4x4 stride-2 transposed conv before the last 1x1 conv doubles the output size (thin edges).
    """

    def __init__(self, feature_channels, t_emb_dim, out_channels, resolution, projection_channels=384, output="tanh",
                 upsample=False):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"probe output must be one of {OUTPUTS}, got {output!r}")
        if projection_channels % 4:
            raise ValueError(f"projection_channels must be a multiple of 4 (bottleneck width P/4), "
                             f"got {projection_channels}")
        feature_channels = [int(c) for c in feature_channels]
        resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.feature_channels, self.t_emb_dim, self.resolution, self.output = (feature_channels, t_emb_dim,
                                                                               resolution, output)

        self.bottlenecks = nn.ModuleList(TimestepBottleneck(c, projection_channels, t_emb_dim)
                                         for c in feature_channels)
        self.mixing_logits = nn.Parameter(torch.ones(len(feature_channels)))  # w_l; softmax(w) starts uniform
        upsampling = [nn.ConvTranspose2d(32, 32, kernel_size=4, stride=2, padding=1), nn.SiLU()] if upsample else []
        self.head = nn.Sequential(
            nn.Conv2d(projection_channels, 128, kernel_size=3, padding=1), nn.SiLU(),
            nn.Conv2d(128, 32, kernel_size=3, padding=1), nn.SiLU(),
            *upsampling,
            nn.Conv2d(32, out_channels, kernel_size=1),
        )

    def mixing_weights(self):
        """softmax(w): one weight per feature map, summing to 1. -> (L,)"""
        return self.mixing_logits.softmax(0)

    def check_features(self, features):
        channels = [f.shape[1] for f in features]
        if channels != self.feature_channels:
            raise ValueError(f"probe expects {len(self.feature_channels)} feature maps with channels "
                             f"{self.feature_channels}, got {len(channels)} with channels {channels}")

    def forward(self, features, t_emb):
        """features: list of (B, C_l, H_l, W_l); t_emb (B, D_t) -> (B, C_out, R, R) ((B, C_out, 2R, 2R) upsampled)."""
        self.check_features(features)
        weights = self.mixing_weights()  # (L,)
        mixed = 0
        for weight, bottleneck, feature in zip(weights, self.bottlenecks, features):
            resized = F.interpolate(feature, size=self.resolution, mode="bilinear", align_corners=False)
            mixed = mixed + weight * bottleneck(resized, t_emb)  # (B, C_l, R, R) -> (B, P, R, R)
        out = self.head(mixed)  # (B, C_out, R, R)
        return out.tanh() if self.output == "tanh" else out
