"""The FID Inception-v3: the 2015-12-05 TensorFlow graph behind FID, sFID, IS and precision/recall.

The standard evaluators (TTUR `fid.py`, the ADM suite `evaluations/evaluator.py`) run the frozen TF graph
`classify_image_graph_def.pb` of inception-2015-12-05.tgz. This module rebuilds that network with the parameter names
of its widely used PyTorch port (pytorch-fid, `pt_inception-2015-12-05-6726825d.pth`), so the port's file loads as it
is. The graph differs from torchvision's Inception-v3 in three places (pytorch-fid's FIDInception* blocks):
  - the stride-1 3x3 average pools of the A, C and first E blocks average over the in-image pixels only (TF 'SAME'
    pooling), not over the zero padding;
  - the pool branch of the last E block (Mixed_7c) takes a max, not an average;
  - 1008 classes (fc 2048 -> 1008) and no auxiliary head.

Outputs, named after the TF tensors the evaluators read:
  pool     (N, 2048)  pool_3, the global average of Mixed_7c                                 -> FID, precision/recall
  logits   (N, 1008)  pool_3 times the softmax weights, without the bias: the IS code of improved-GAN and of the ADM
                      suite multiplies by `softmax/logits/MatMul`'s weight only                  -> Inception Score
  spatial  (N, 2023)  mixed_6/conv[..., :7]: the first 7 channels of Mixed_6d's 1x1 branch (17 x 17), flattened in
                      TF's (H, W, C) order so that ADM reference statistics (mu_s, sigma_s) line up   -> sFID

Input: RGB (N, 3, H, W) in [0, 1], any size, brought to 299 x 299 by one of two pipelines (`resize`):
  tf1      the TF graph's own (the default): the 8-bit pixels u = 255 x, TF1's legacy ResizeBilinear
           (`resize_bilinear_tf1`), then (u - 128) / 128. The ADM reference batches' stored mu/sigma come from it.
  pytorch  pytorch-fid's: PyTorch's half-pixel bilinear resize of x, then 2 x - 1 = (u - 127.5) / 127.5.
At 256 -> 299 the two resizes sample 0.07 px apart: compare only numbers that went through the same pipeline.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.checkpoints import read_checkpoint

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
WEIGHTS_ENV = "REF_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM evaluator: spatial = mixed_6/conv[..., :7]


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights are missing, unreadable or not laid out as the public file."""


EXPECTED_FILE = (f"{WEIGHTS_FILE} (about 95.6 MB, a state dict of the pytorch-fid port of the TF 2015-12-05 "
                 f"Inception: Conv2d_1a_3x3.conv.weight ... Mixed_7c.branch_pool.bn.running_var, fc.weight, fc.bias)")


def missing_weights(problem):
    """The error for weights not given or not on disk: what is needed and where people get it (one line)."""
    return InceptionWeightsError(f"{problem}; the FID Inception needs {EXPECTED_FILE}: download it from the "
                                 f"pytorch-fid GitHub release ({WEIGHTS_URL}) and pass --inception PATH or set "
                                 f"{WEIGHTS_ENV}=PATH")


def wrong_weights(path, found):
    """The error for a file that is there but is not the weights: what it holds, then what was expected (one line)."""
    size = f"{os.path.getsize(path) / 1e6:.1f} MB"
    return InceptionWeightsError(f"{path} ({size}) {found}; --inception expects {EXPECTED_FILE}")


# ---------------------------------------------------------------------------------------------------------------------
# Input pipelines: [0, 1] images -> the network's 299 x 299 input
# ---------------------------------------------------------------------------------------------------------------------

def tf1_sample_positions(in_size, out_size, device=None):
    """Where TF1's legacy bilinear resize (align_corners=False, half_pixel_centers=False) reads for each output pixel
    d: position d * in/out (no half-pixel shift), in float32 as TF's kernel computes it (numpy here: torch may divide
    by a scalar as a product with its reciprocal); the pair of pixels around it, the upper one clamped to the last
    pixel, and the weight of the upper one. -> lower, upper (long), lerp, each (out,)"""
    position = np.arange(out_size, dtype=np.float32) * (np.float32(in_size) / np.float32(out_size))
    lower = np.floor(position)
    upper = np.minimum(np.ceil(position), in_size - 1)
    return (torch.from_numpy(lower).long().to(device), torch.from_numpy(upper).long().to(device),
            torch.from_numpy(position - lower).to(device))


def resize_bilinear_tf1(images, size):
    """TF1 `ResizeBilinear` as the 2015 Inception graph runs it (tensorflow resize_bilinear_op.cc, CPU kernel): each
    input row interpolated along x, then the two rows around each output row along y, with the kernel's float32
    operations (top = top_left + (top_right - top_left) x_lerp, the same for bottom, top + (bottom - top) y_lerp).
    float32 (N, C, H, W) -> (N, C, size, size)"""
    y_lower, y_upper, y_lerp = tf1_sample_positions(images.shape[2], size, images.device)
    x_lower, x_upper, x_lerp = tf1_sample_positions(images.shape[3], size, images.device)
    left = images.index_select(3, x_lower)  # (N, C, H, size)
    rows = images.index_select(3, x_upper).sub_(left).mul_(x_lerp).add_(left)  # every input row, along x
    top = rows.index_select(2, y_lower)  # (N, C, size, size)
    return rows.index_select(2, y_upper).sub_(top).mul_(y_lerp[:, None]).add_(top)


def tf_graph_input(images):
    """The TF graph's pipeline: 8-bit pixels u = 255 x (rounded, so that uint8 images / 255 give back their exact
    values), TF1 bilinear resize to 299, then (u - 128) / 128 (the graph's Sub 128 and Mul 1/128).
    (N, 3, H, W) in [0, 1] -> (N, 3, 299, 299)"""
    pixels = torch.round(images.float() * 255)
    return (resize_bilinear_tf1(pixels, INPUT_SIZE) - 128) / 128


def pytorch_fid_input(images):
    """pytorch-fid's pipeline: PyTorch bilinear (half-pixel centres: output d reads (d + 0.5) in/out - 0.5), then
    2 x - 1 = (u - 127.5) / 127.5. (N, 3, H, W) in [0, 1] -> (N, 3, 299, 299)"""
    resized = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * resized - 1


INPUT_PIPELINES = {"tf1": tf_graph_input, "pytorch": pytorch_fid_input}


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------------

class ConvBN(nn.Module):
    """Every convolution of the graph: conv without bias, BatchNorm (TF's eps 0.001), ReLU; the port's BasicConv2d."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def pool_3x3(x, kind):
    """The stride-1 3x3 pool in front of a block's pool branch; 'avg' excludes the padding (TF 'SAME' average)."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


class Mixed(nn.Module):
    """An Inception block: parallel branches, concatenated along channels in the order `branches` returns them."""

    def branches(self, x):
        raise NotImplementedError

    def forward(self, x):
        return torch.cat(self.branches(x), dim=1)


class InceptionA(Mixed):
    """35 x 35 (Mixed_5b/c/d): 1x1 | 1x1 5x5 | 1x1 3x3 3x3 | avg-pool 1x1. Out: 64 + 64 + 96 + pool_features."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def branches(self, x):
        return [self.branch1x1(x),
                chain(x, self.branch5x5_1, self.branch5x5_2),
                chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                self.branch_pool(pool_3x3(x, "avg"))]


class InceptionB(Mixed):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1 3x3 3x3/2 | max-pool/2. Out: 384 + 96 + in_channels."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def branches(self, x):
        return [self.branch3x3(x),
                chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                F.max_pool2d(x, kernel_size=3, stride=2)]


class InceptionC(Mixed):
    """17 x 17 (Mixed_6b..e), factorised 7x7: 1x1 | 1x1 1x7 7x1 | 1x1 7x1 1x7 7x1 1x7 | avg-pool 1x1. Out: 4 x 192."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def branches(self, x):
        return [self.branch1x1(x),
                chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5),
                self.branch_pool(pool_3x3(x, "avg"))]


class InceptionD(Mixed):
    """17 -> 8 reduction (Mixed_7a): 1x1 3x3/2 | 1x1 1x7 7x1 3x3/2 | max-pool/2. Out: 320 + 192 + in_channels."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def branches(self, x):
        return [chain(x, self.branch3x3_1, self.branch3x3_2),
                chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                F.max_pool2d(x, kernel_size=3, stride=2)]


class InceptionE(Mixed):
    """8 x 8 (Mixed_7b/c): 1x1 | 1x1 (1x3, 3x1) | 1x1 3x3 (1x3, 3x1) | pool 1x1. Out: 320 + 768 + 768 + 192 = 2048.
    `pool` is 'avg' in Mixed_7b and 'max' in Mixed_7c (the FID graph's quirk)."""

    def __init__(self, in_channels, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def branches(self, x):
        narrow = self.branch3x3_1(x)
        deep = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        return [self.branch1x1(x),
                torch.cat([self.branch3x3_2a(narrow), self.branch3x3_2b(narrow)], dim=1),
                torch.cat([self.branch3x3dbl_3a(deep), self.branch3x3dbl_3b(deep)], dim=1),
                self.branch_pool(pool_3x3(x, self.pool))]


# ---------------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------------

class FIDInceptionV3(nn.Module):
    """The FID Inception, frozen in eval mode. Weights: `weights` (a path), else $REF_INCEPTION_WEIGHTS; a missing or
    malformed file raises InceptionWeightsError. `random_weights=True` skips loading (tests and speed benchmarks only:
    its numbers mean nothing). `resize`: the input pipeline, "tf1" (the TF graph's) or "pytorch" (pytorch-fid's)."""

    def __init__(self, weights=None, random_weights=False, resize="tf1"):
        super().__init__()
        if resize not in INPUT_PIPELINES:
            raise ValueError(f"resize {resize!r}: expected one of {', '.join(INPUT_PIPELINES)}")
        self.resize = resize
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # in the file; only its weight is used (the IS logits leave the bias out)
        if not random_weights:
            load_weights(self, weights_path(weights))
        self.eval().requires_grad_(False)

    def forward(self, images):
        """RGB (N, 3, H, W) in [0, 1] -> {"pool": (N, 2048), "logits": (N, 1008), "spatial": (N, 2023)}."""
        x = INPUT_PIPELINES[self.resize](images)  # (N, 3, 299, 299) in [-1, 1]
        x = chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = chain(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c)
        branches = self.Mixed_6d.branches(x)  # (N, 768, 17, 17) once concatenated
        spatial = branches[0][:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17): TF mixed_6/conv, first 7 channels
        x = chain(torch.cat(branches, dim=1), self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        pool = x.mean(dim=(2, 3))  # (N, 2048, 8, 8) -> (N, 2048): pool_3
        return {"pool": pool,
                "logits": pool @ self.fc.weight.T,  # (N, 1008)
                "spatial": spatial.permute(0, 2, 3, 1).flatten(1)}  # (N, 17 * 17 * 7) in (H, W, C) order


# ---------------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------------

def weights_path(path=None):
    """The weights file: `path`, else $REF_INCEPTION_WEIGHTS; it must exist."""
    path = path or os.environ.get(WEIGHTS_ENV)
    if not path:
        raise missing_weights("no FID Inception weights given")
    if not os.path.isfile(path):
        raise missing_weights(f"FID Inception weights {path}: no such file")
    return path


def layout(state_dict):
    """name -> shape (or type, for what is not a tensor) of everything the file must hold. BatchNorm's
    `num_batches_tracked` counter plays no part in evaluation and is optional, so it is left out."""
    return {name: tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            for name, value in state_dict.items() if not name.endswith("num_batches_tracked")}


def contents(state):
    """A dict loaded from a file, in a few words: how many entries and tensors, and the first keys."""
    tensors = sum(torch.is_tensor(value) for value in state.values())
    keys = ", ".join(map(str, list(state)[:3])) + (", ..." if len(state) > 3 else "")
    return f"holds {len(state)} entries ({tensors} tensors; keys {keys})"


def load_weights(model, path):
    """Load the port's state dict into `model`, refusing any file whose keys or shapes differ from the public one."""
    try:
        state_dict = read_checkpoint(path)
    except ValueError as error:  # a truncated download, an HTML page, a pickle of something else: all the same to us
        raise wrong_weights(path, f"could not be read as a PyTorch state dict of tensors ({error}; a truncated "
                                  f"download, a web page, a pickle of other objects?)") from None
    if not isinstance(state_dict, dict):
        raise wrong_weights(path, f"holds a {type(state_dict).__name__}, not a state dict")
    expected, found = layout(model.state_dict()), layout(state_dict)
    if not expected.keys() & found.keys():
        raise wrong_weights(path, f"{contents(state_dict)}, none of the FID Inception's keys (expected e.g. "
                                  f"{next(iter(expected))})")
    problems = ([f"{name}: shape {found[name]}, expected {shape}"
                 for name, shape in expected.items() if name in found and found[name] != shape]
                + [f"unexpected {name}" for name in found if name not in expected]
                + [f"missing {name}" for name in expected if name not in found])
    if problems:
        listed = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise wrong_weights(path, f"is not laid out as the public file: {listed}")
    model.load_state_dict({name: state_dict[name] for name in found}, strict=False)  # keys checked just above
