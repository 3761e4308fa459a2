"""The LineArt annotator of ControlNet 1.1 (`sk_model.pth`, and the coarse `sk_model2.pth`, lllyasviel/Annotators):
the reward model D of Eq. 6 for the LineArt task (ControlNet++ and InnerControl use the annotator itself, the paper's
"ControlNet*" column of Table 4) and the model whose outputs the evaluation compares by SSIM / MS-SSIM. The releases
load Informative Drawings' own `model.pth` (huggingface.co/spaces/awacke1/Image-to-Line-Drawings: ControlNet++
eval/eval.py:123, InnerControl train/aligned_linedrawing.sh:3) into the same network; any file of this layout loads.

Network: the generator of Informative Drawings (Chan et al. 2022), a pix2pix-style encoder / residual / decoder
(ControlNet-v1-1-nightly annotator/lineart/__init__.py:14-82, built there as `Generator(3, 1, 3)` at :105; ControlNet++
train/utils.py:210 `LineDrawingModel(n_residual_blocks=3)`, the same in InnerControl's train/utils.py:134):
  model0   reflection pad 3, conv 7x7 3 -> 64, InstanceNorm, ReLU                                  (B, 64, H, W)
  model1   2 x [conv 3x3 stride 2 pad 1, InstanceNorm, ReLU]: 64 -> 128 -> 256                      (B, 256, H/4, W/4)
  model2   3 residual blocks: x + [pad 1, conv 3x3, IN, ReLU, pad 1, conv 3x3, IN](x), 256 channels
  model3   2 x [transposed conv 3x3 stride 2 pad 1 output_padding 1, InstanceNorm, ReLU]: 256 -> 128 -> 64
  model4   reflection pad 3, conv 7x7 64 -> 1, sigmoid                                              (B, 1, H, W)
InstanceNorm2d with its defaults (annotator/lineart/__init__.py:14): no affine weights, no running statistics, so the
file holds conv weights only: 24 tensors, 4,290,945 parameters (counted by hand from the layout above), keys
`model0.1.*`, `model1.{0,3}.*`, `model2.{k}.conv_block.{1,5}.*`, `model3.{0,3}.*`, `model4.1.*` (the indices of the
convs inside each nn.Sequential; the file loads with load_state_dict's strict default there).

Input and output: RGB in [0, 1] as it is (the annotator divides the uint8 image by 255, :117; ControlNet++ feeds
the decoded `(image / 2 + 0.5).clamp(0, 1)` unnormalised, train/reward_control.py:1441 and :1448-1449). The generator
draws dark lines on white; ControlNet 1.1's hint is its inverse (gradio_lineart.py:48 `1 - map / 255`; ControlNet++
gives the ControlNet `1 - labels`, reward_control.py:1380, and saves the evaluation label as `1 - D(image)`,
eval/eval.py:197), so this module returns `1 - G(image)`: white lines on black, the map a lineart control folder
holds. The reward's MSE is the same on either side of the inversion; the evaluation's SSIM compares the inverted maps,
as ControlNet++'s eval/eval_edge.py:59 does (`pred_condition = 1 - pred_condition`, there on the uint8 PNG: 0 wraps to
1/255, so the darkest line pixels of the generated drawing count as background, and every value k >= 2 becomes
(257 - k) / 255; not reproduced). The map stays a float: the reward's gradient reaches the image (no uint8 rounding
as in the annotator's wrapper, :122).
"""
import torch.nn as nn

from ref.annotator_weights import load_task_weights

WIDTH = 64  # channels after model0; x2 per downsampling
RESIDUAL_BLOCKS = 3  # Generator(3, 1, 3): annotator/lineart/__init__.py:105
DOWNSAMPLING = 4  # two stride-2 convs: H and W must be multiples of it for the map to keep the image's size


def normalised(conv):
    """conv, InstanceNorm (no affine, no running stats), ReLU: the [conv, norm_layer, ReLU] triple of the file."""
    return [conv, nn.InstanceNorm2d(conv.out_channels), nn.ReLU()]


class ResidualBlock(nn.Module):
    """x + (pad, conv 3x3, IN, ReLU, pad, conv 3x3, IN)(x); keys conv_block.1 and conv_block.5. (B, C, H, W) ->
    same"""

    def __init__(self, channels):
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), *normalised(nn.Conv2d(channels, channels, 3)),
                                        nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3),
                                        nn.InstanceNorm2d(channels))

    def forward(self, x):
        return x + self.conv_block(x)


class LineArtAnnotator(nn.Module):
    """image (B, 3, H, W), RGB in [0, 1], H and W multiples of 4 -> line map (B, 1, H, W) in [0, 1], white lines on
    black (1 - the generator's drawing), differentiable. Frozen, eval mode.
    weights: an sk_model.pth / sk_model2.pth (or .safetensors) path; None leaves random weights (tests only)."""

    def __init__(self, weights=None):
        super().__init__()
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), *normalised(nn.Conv2d(3, WIDTH, 7)))
        self.model1 = nn.Sequential(*normalised(nn.Conv2d(WIDTH, 2 * WIDTH, 3, stride=2, padding=1)),
                                    *normalised(nn.Conv2d(2 * WIDTH, 4 * WIDTH, 3, stride=2, padding=1)))
        self.model2 = nn.Sequential(*(ResidualBlock(4 * WIDTH) for _ in range(RESIDUAL_BLOCKS)))
        self.model3 = nn.Sequential(
            *normalised(nn.ConvTranspose2d(4 * WIDTH, 2 * WIDTH, 3, stride=2, padding=1, output_padding=1)),
            *normalised(nn.ConvTranspose2d(2 * WIDTH, WIDTH, 3, stride=2, padding=1, output_padding=1)))
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(WIDTH, 1, 7), nn.Sigmoid())
        if weights is not None:
            load_task_weights(self, weights, "lineart")
        self.eval().requires_grad_(False)

    def drawing(self, image):
        """The generator's own output: dark lines on white, (B, 1, H, W) in [0, 1]."""
        if image.shape[-1] % DOWNSAMPLING or image.shape[-2] % DOWNSAMPLING:
            raise ValueError(f"the LineArt annotator needs sides that are multiples of {DOWNSAMPLING}, got "
                             f"{tuple(image.shape[-2:])}")
        x = image
        for stage in (self.model0, self.model1, self.model2, self.model3, self.model4):
            x = stage(x)
        return x

    def forward(self, image):
        return 1 - self.drawing(image)  # (B, 1, H, W): ControlNet 1.1's lineart hint
