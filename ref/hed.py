"""The HED soft-edge annotator of ControlNet 1.1 (`ControlNetHED_Apache2`, file `ControlNetHED_Apache2.pth`): the
reward model D of Eq. 6 for the HED task (ControlNet++ and InnerControl use the annotator itself, Table 4) and the
model whose outputs the evaluation compares by SSIM.

Network (Xie & Tu's HED on a VGG-16 trunk, re-trained by ControlNet's author on RGB input):
  x - norm                      a learned per-channel offset (1, 3, 1, 1) subtracted from the 0-255 RGB input
  block1 .. block5              2, 2, 3, 3, 3 convs 3x3 + ReLU with 64, 128, 256, 512, 512 channels; blocks 2-5 start
                                with a 2x2 max pool; each block ends in a 1x1 `projection` to one side output
  edge = sigmoid(mean_k upsample(projection_k))   the five side outputs bilinearly resized to the input size
                                (half-pixel centres, as cv2.INTER_LINEAR in the annotator), averaged, squashed.
Parameters: 14,716,168 (counted by hand from the layout above; the notes give the same figure).

Input preprocessing as ControlNet++'s wrapper: RGB in [0, 1], times 255, clipped to [0, 255]. The released wrapper
then rounds the map to uint8, which passes no gradient to the reward; here the map stays a float in [0, 1], so the
reward's gradient reaches the image (the clip passes it for every pixel inside [0, 1]).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.annotator_weights import load_task_weights

BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))  # (in, out, convs) per block


class ConvBlock(nn.Module):
    """`convs` 3x3 convs with ReLU after each (the first from in_channels), then a 1x1 side output. The file's
    DoubleConvBlock. (B, C_in, H, W) -> (B, C_out, H, W), (B, 1, H, W)"""

    def __init__(self, in_channels, out_channels, convs):
        super().__init__()
        self.convs = nn.Sequential(*(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1)
                                     for i in range(convs)))
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDAnnotator(nn.Module):
    """image (B, 3, H, W), RGB in [0, 1] -> soft edges (B, 1, H, W) in [0, 1], differentiable. Frozen, eval mode.
    weights: a ControlNetHED_Apache2.pth (or .safetensors) path; None leaves random weights (tests only)."""

    def __init__(self, weights=None):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for index, (in_channels, out_channels, convs) in enumerate(BLOCKS, start=1):
            self.add_module(f"block{index}", ConvBlock(in_channels, out_channels, convs))
        if weights is not None:
            load_task_weights(self, weights, "hed")
        self.eval().requires_grad_(False)

    def side_outputs(self, image):
        """The five 1x1 projections, at full, 1/2, 1/4, 1/8 and 1/16 resolution. -> [(B, 1, H / 2^k, W / 2^k)]"""
        x = (image * 255).clamp(0, 255) - self.norm  # (B, 3, H, W)
        outputs = []
        for index in range(1, len(BLOCKS) + 1):
            if index > 1:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            x, projection = getattr(self, f"block{index}")(x)
            outputs.append(projection)
        return outputs

    def forward(self, image):
        size = image.shape[-2:]
        sides = [F.interpolate(side, size=size, mode="bilinear", align_corners=False)
                 for side in self.side_outputs(image)]
        return torch.stack(sides).mean(0).sigmoid()  # (B, 1, H, W)

