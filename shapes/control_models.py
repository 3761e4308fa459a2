"""Control estimators D: image -> depth / segmentation / edges. They stand in for the annotators of ControlNet++ and
InnerControl (DPT / MiDaS depth, segmenters, HED): a weaker one is the reward model of Eq. 6, a stronger one, trained
apart, is the evaluation model that scores generated images (the notes: "reward model weaker than the evaluation
model"). On the shapes data they are small two-level conv nets trained on (image, exact control) pairs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.probes import group_norm

ESTIMATOR_OUTPUTS = ("sigmoid", "logits")


class ResidualConv(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), channels kept. (B, C, H, W) -> (B, C, H, W)"""

    def __init__(self, channels):
        super().__init__()
        self.layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                    group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.layers(x)


class ControlEstimator(nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> (B, out_channels, H, W): maps in [0, 1] (output "sigmoid": depth, edges) or
    class logits (output "logits": segmentation).

    width: channels at full resolution (twice that at half resolution); blocks: residual blocks per level. The half
    resolution level widens the receptive field (depth needs the occlusion order of whole objects); a skip from the
    full-resolution level keeps thin edges sharp. H and W must be even."""

    def __init__(self, out_channels, width, blocks, output="sigmoid"):
        super().__init__()
        if output not in ESTIMATOR_OUTPUTS:
            raise ValueError(f"estimator output must be one of {ESTIMATOR_OUTPUTS}, got {output!r}")
        self.output = output
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.full_resolution = nn.Sequential(*(ResidualConv(width) for _ in range(blocks)))
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.half_resolution = nn.Sequential(*(ResidualConv(2 * width) for _ in range(blocks)))
        self.up = nn.Conv2d(2 * width, width, 3, padding=1)
        self.merge = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), ResidualConv(width),
                                   group_norm(width), nn.SiLU(), nn.Conv2d(width, out_channels, 1))

    def forward(self, image):
        full = self.full_resolution(self.stem(image))  # (B, W, H, W)
        half = self.half_resolution(self.down(full))  # (B, 2W, H/2, W/2)
        up = self.up(F.interpolate(half, scale_factor=2, mode="nearest"))  # (B, W, H, W)
        out = self.merge(torch.cat([full, up], dim=1))  # (B, C_out, H, W)
        return out.sigmoid() if self.output == "sigmoid" else out
