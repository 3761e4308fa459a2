"""Segmentation reward and evaluation model through a plug-in: any TorchScript file that maps images to class logits.

ControlNet++ and InnerControl score segmentation with mmsegmentation models (UperNet-R50 as the reward model,
Mask2Former as the evaluation model, Table 4); those are heavy and bound to their framework, so this project loads
whatever segmenter the user exports as TorchScript instead.

The plug-in contract (what the file must do):
  input   images (B, 3, H, W), float32, RGB normalised with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229,
          0.224, 0.225): ControlNet++'s normalisation for the segmenter, the same as mmsegmentation's data
          preprocessor on 0-255 pixels (mean 123.675, 116.28, 103.53; std 58.395, 57.12, 57.375);
  output  one tensor of class logits (B, K, h, w), any h, w (a stride-4 decoder gives H/4 x W/4), K the dataset's
          classes WITHOUT a background class (ADE20K: 150; label 255 marks pixels without a class, as in ControlNet++).
  export  e.g. `torch.jit.trace(segmenter.eval(), torch.zeros(1, 3, 512, 512)).save("upernet_r50_ade20k.pt")`
          around the normalised-image -> logits part of the model (mmsegmentation: `model.encode_decode`).
The file is checked on a probe batch when it is loaded: anything but a TorchScript archive (a state dict, another
model's weights) or an output other than floating logits of shape (B, K, h, w) is refused with a ValueError naming the
file and what came out.

This wrapper takes RGB in [0, 1], normalises it, and gives the program's logits at their own size. The reward (Eq. 6)
is the per-sample cross-entropy of ref.control_losses against the label map brought to the logits' size by nearest
neighbour, label 255 left out, as ControlNet++'s reward (`train/reward_control.py`:1494-1495); the evaluation resizes
the logits bilinearly to the label map instead (ref.control_evaluation.at_size), as mmsegmentation's inference does.
"""
import torch
import torch.nn as nn

from ref.annotator_weights import refuse_unless_torchscript
from ref.control_losses import control_loss

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPECTED = "a TorchScript segmenter (torch.jit.save of a module: normalised images (B, 3, H, W) -> logits (B, K, h, w))"
PROBE_BATCH = 2


class TorchScriptSegmenter(nn.Module):
    """image (B, 3, H, W), RGB in [0, 1] -> class logits (B, K, h, w) at the program's own size. Frozen,
    differentiable with respect to the image (if the program is).

    path: the TorchScript file; num_classes: K the logits must have (None accepts any K >= 2); probe_size: side of the
    probe batch the output is checked on (at least the smallest input the segmenter accepts)."""

    def __init__(self, path, num_classes=None, probe_size=256):
        super().__init__()
        refuse_unless_torchscript(path, EXPECTED)
        try:
            program = torch.jit.load(path, map_location="cpu")
        except Exception as error:
            raise ValueError(f"{path} could not be loaded as {EXPECTED}: {type(error).__name__}: "
                             f"{str(error).splitlines()[0]}") from error
        for parameter in program.parameters():  # a ScriptModule has no requires_grad_()
            parameter.requires_grad_(False)
        self.program = program.eval()
        self.num_classes = self.check_output(path, num_classes, probe_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def check_output(self, path, num_classes, probe_size):
        """Run the program on a probe batch (a ramp over the normalised range) and refuse any output but logits. -> K"""
        probe = torch.linspace(-2, 2, 3 * probe_size ** 2).reshape(1, 3, probe_size, probe_size)
        probe = probe.repeat(PROBE_BATCH, 1, 1, 1)  # (2, 3, P, P)
        try:
            with torch.no_grad():
                output = self.program(probe)
        except Exception as error:
            raise ValueError(f"{path} failed on a probe batch {tuple(probe.shape)} of normalised images: "
                             f"{type(error).__name__}: {str(error).splitlines()[0]}") from error
        expected = f"logits (B, K, h, w) = ({PROBE_BATCH}, {num_classes or 'K >= 2'}, h, w)"
        if not torch.is_tensor(output):
            raise ValueError(f"{path} returned a {type(output).__name__} for a probe batch {tuple(probe.shape)}, "
                             f"not one tensor of {expected}")
        problem = None
        if output.ndim != 4:
            problem = f"{output.ndim} dimensions"
        elif output.shape[0] != PROBE_BATCH:
            problem = f"a batch of {output.shape[0]}"
        elif not output.is_floating_point():
            problem = f"{output.dtype} values (class indices?)"
        elif output.shape[1] < 2 or (num_classes is not None and output.shape[1] != num_classes):
            problem = f"{output.shape[1]} channel(s)"
        elif not torch.isfinite(output).all():
            problem = "non-finite values"
        if problem:
            raise ValueError(f"{path} returned {output.dtype} {tuple(output.shape)} for a probe batch "
                             f"{tuple(probe.shape)}: {problem}, not {expected}")
        return output.shape[1]

    def forward(self, image):
        return self.program((image - self.mean) / self.std)  # (B, K, h, w)


def segmentation_reward(segmenter, image, labels):
    """Eq. 6 for segmentation: the cross-entropy of the segmenter's logits on `image` (B, 3, H, W) in [0, 1] against
    `labels` (B, H_c, W_c) integer classes downsampled (nearest) to the logits' size, 255 ignored. -> (B,)"""
    return control_loss(segmenter(image), labels, "cross_entropy")
