"""The control comparisons L(c_spatial, c_hat) of InnerControl's reward (Eq. 6) and alignment (Eq. 7) terms, and of
the models that read a control back (DPT's depth normalisation, the segmenter's reward): here, below both, so that the
networks (ref/dpt.py, ref/segmenter.py) and the paper's module (ref/innercontrol.py) can share them.

Every comparison returns one value per sample, the mean over C, H, W taken BEFORE any timestep mask, as the
InnerControl release's `train/reward_control.py` does (a per-sample `.mean(dim=(-1, -2))` of the pixel loss), so
alpha and beta do not depend on the resolution.
"""
import torch
import torch.nn.functional as F

from ref.losses import mean_squared_error

IGNORE_LABEL = 255  # segmentation pixels without a class; they add nothing to the cross-entropy
CONTROL_LOSSES = ("mse", "max_normalised_mse", "sparse_mse", "cross_entropy")


def max_normalised(maps, eps=1e-8):
    """Each sample divided by its own maximum (ControlNet++ depth: the reward model's relative depth and the control
    both mapped to (0, 1]). (B, ...) -> (B, ...); maps are non-negative."""
    peak = maps.flatten(1).amax(1).clamp_min(eps)  # (B,)
    return maps / peak.reshape((-1,) + (1,) * (maps.ndim - 1))


def depth_normalised(maps):
    """The release's depth maps: the mean over channels, then each sample divided by its own maximum, so a map's
    scale does not count, only its shape (InnerControl `train/reward_control_aligned.py`:1780-1782 for the label,
    :1841-1843 for the probe's output). (B, C, H, W) -> (B, 1, H, W)"""
    return max_normalised(maps.mean(1, keepdim=True))


def sparse_mse(prediction, target):
    """Thin-edge MSE: the mean of the MSE over the background pixels (target == its per-sample minimum) and the MSE
    over the foreground pixels, each averaged over its own pixels, so a few edge pixels weigh as much as the
    background. A sample without foreground gets its background MSE. (B, C, H, W) x 2 -> (B,)"""
    squared = (prediction - target).square().flatten(1)  # (B, CHW)
    flat_target = target.flatten(1)  # (B, CHW)
    background = flat_target == flat_target.amin(1, keepdim=True)  # (B, CHW), never empty
    foreground = ~background
    background_mse = (squared * background).sum(1) / background.sum(1)  # (B,)
    foreground_mse = (squared * foreground).sum(1) / foreground.sum(1).clamp_min(1)  # (B,)
    return torch.where(foreground.any(1), (background_mse + foreground_mse) / 2, background_mse)


def labels_at(labels, size):
    """Class maps resized to `size` by nearest neighbour, output pixel (i, j) taking input pixel (floor(i H / h),
    floor(j W / w)): torchvision's NEAREST, with which ControlNet++ brings its labels to the size of the segmenter's
    logits (`train/utils.py`:131 in `seg_label_transform`, called at `train/reward_control.py`:1494-1495), so no
    class is invented. (B, H, W) integer -> (B, h, w) long"""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()  # exact below 2^24


def cross_entropy(logits, labels):
    """Pixel cross-entropy averaged over each sample's labelled pixels (label IGNORE_LABEL left out; a sample with
    none gives 0), at the logits' size: labels of another size are brought to it (labels_at), as ControlNet++'s
    reward does (`train/reward_control.py`:1494-1495, :1510-1513). logits (B, K, h, w), labels (B, H, W) integer
    -> (B,)"""
    labels = labels_at(labels, logits.shape[-2:])  # (B, h, w)
    pixels = F.cross_entropy(logits, labels, ignore_index=IGNORE_LABEL, reduction="none")  # (B, h, w), 0 if ignored
    labelled = (labels != IGNORE_LABEL).flatten(1).sum(1)  # (B,)
    return pixels.flatten(1).sum(1) / labelled.clamp_min(1)


def control_loss(prediction, control, kind):
    """L(c_spatial, c_hat) per sample -> (B,), computed in float32.

    kind: "mse", "max_normalised_mse" (depth: both maps depth_normalised first), "sparse_mse" (thin edges) on
        (B, C, H, W) maps of equal shape;
        "cross_entropy" on logits (B, K, h, w) against class indices (B, H, W) of any size (cross_entropy).
    A map control of another size or channel count than the prediction raises a ValueError naming both shapes."""
    if kind not in CONTROL_LOSSES:
        raise ValueError(f"control loss must be one of {CONTROL_LOSSES}, got {kind!r}")
    prediction = prediction.float()
    if kind == "cross_entropy":
        if control.ndim != 3 or len(control) != len(prediction) or control.is_floating_point():
            raise ValueError(f"cross-entropy expects integer class indices of shape (B, H, W), B = {len(prediction)}, "
                             f"for logits {tuple(prediction.shape)}, got {control.dtype} {tuple(control.shape)}")
        return cross_entropy(prediction, control)
    if control.shape != prediction.shape:
        raise ValueError(f"control of shape {tuple(control.shape)} does not match the prediction's "
                         f"{tuple(prediction.shape)} (B, C, H, W)")
    control = control.float()
    if kind == "sparse_mse":
        return sparse_mse(prediction, control)
    if kind == "max_normalised_mse":
        prediction, control = depth_normalised(prediction), depth_normalised(control)
    return mean_squared_error(prediction, control)
