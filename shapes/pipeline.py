"""The InnerControl pipeline's pieces on the shapes data: the caption tokenizer, the tasks (a control and how each
stage handles it), controls as ControlNet hints and as pictures, caption dropout, and the base text-to-image model.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.innercontrol import innercontrol_task
from ref.losses import drop_captions as drop_empty_captions
from shapes.data import CAPTION_VOCABULARY, MAX_OBJECTS, SHAPE_CLASSES
from shapes.text import PAD, Tokenizer

CAPTION_TOKENIZER = Tokenizer(CAPTION_VOCABULARY, max_length=4 * MAX_OBJECTS - 1)  # "a red circle and a ..."


@dataclass(frozen=True)
class ShapesTask:
    """A control of the shapes data and how every stage handles it.

    channels: output channels of the probe and the estimators (1 map, or one logit per segment class).
    hint_channels: channels of the ControlNet's input control (segmentation: one-hot).
    table4: the column of Table 4 (ref.losses.INNERCONTROL_TASKS) giving alpha, beta, ranges and comparisons; shapes
        edges are soft occluding contours, so they take HED's column (sparse MSE alignment).
    The probe and the estimators are trained with the probe's comparison (`probe_kind`: maps in [0, 1] or class
    indices)."""
    channels: int
    hint_channels: int
    table4: str

    @property
    def settings(self):
        return innercontrol_task(self.table4)

    @property
    def categorical(self):
        return self.settings.alignment_kind == "cross_entropy"


SEGMENT_CLASSES = 1 + len(SHAPE_CLASSES)  # background and one segment class per shape class
SHAPES_TASKS = {
    "depth": ShapesTask(channels=1, hint_channels=1, table4="depth"),
    "segmentation": ShapesTask(channels=SEGMENT_CLASSES, hint_channels=SEGMENT_CLASSES, table4="segmentation"),
    "edges": ShapesTask(channels=1, hint_channels=1, table4="hed"),
}


def shapes_task(name):
    if name not in SHAPES_TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(SHAPES_TASKS)}")
    return SHAPES_TASKS[name]


def control_of(sample, task_name):
    """The exact control of a ShapesSample: depth (1, H, W) or edges (1, H, W) in [0, 1], segmentation (H, W) long."""
    return getattr(sample, task_name)


def hint_of(control, task_name):
    """The ControlNet's input control: the map itself, or the segmentation one-hot. (B, C_hint, H, W) float"""
    if task_name == "segmentation":
        return F.one_hot(control, SEGMENT_CLASSES).permute(0, 3, 1, 2).float()
    return control


SEGMENT_PALETTE = np.array([[40, 40, 40], [230, 60, 60], [60, 200, 80], [70, 110, 240], [240, 220, 50],
                            [220, 80, 220]], dtype=np.uint8)  # background, then one colour per shape class


def control_picture(control, task_name):
    """A control as an RGB picture (H, W, 3) uint8: depth and edges in grey, segments in SEGMENT_PALETTE."""
    if task_name == "segmentation":
        return SEGMENT_PALETTE[control.numpy()]
    grey = (255 * control[0]).round().clamp(0, 255).to(torch.uint8).numpy()  # (H, W)
    return np.repeat(grey[:, :, None], 3, axis=2)


def collate_shapes(samples, task_name=None):
    """ShapesSamples -> image (B, 3, H, W), caption tokens (B, L), and with a task its control."""
    images = torch.stack([sample.image for sample in samples])
    tokens = CAPTION_TOKENIZER([sample.caption for sample in samples])
    if task_name is None:
        return images, tokens
    return images, tokens, torch.stack([control_of(sample, task_name) for sample in samples])


def drop_captions(tokens, probability, draws):
    """Caption dropout for CFG: each caption becomes the empty one (all padding) with the given probability."""
    return drop_empty_captions(tokens, torch.full(tokens.shape[1:], PAD), probability, draws)


class TextToImage(nn.Module):
    """The base model: the UNet reading the caption through the text encoder (SD's UNet + CLIP text encoder).
    forward(x, t, tokens, control=None, taps=None) is the UNet's, with tokens (B, L) for the context."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x, t, tokens, control=None, taps=None):
        return self.unet(x, t, self.text_encoder(tokens), control=control, taps=taps)
