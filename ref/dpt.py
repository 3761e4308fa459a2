"""DPT depth (Ranftl et al. 2021, the MiDaS 3.0 weights) in two presets, with the state-dict keys of transformers'
`DPTForDepthEstimation`, so that the published pytorch_model.bin / model.safetensors load as they are:

  dpt-hybrid-midas  `Intel/dpt-hybrid-midas`, 122,377,985 parameters: the depth reward model D of Eq. 6 that
                    ControlNet++ and InnerControl train with (Table 4; `train.py --reward-model`)
  dpt-large         `Intel/dpt-large`, 343,030,465 parameters: their depth evaluation model (eval/eval.py:119-120 of
                    both releases; `eval.py innercontrol-sd --eval-model`)

  stem          hybrid: a BiT trunk, ResNet-50 v1.5-style, first three stages (3, 4, 9 bottlenecks; 256, 512, 1024
                channels at strides 4, 8, 16) with weight-standardised convs (each filter to zero mean, unit variance,
                eps 1e-8), TF 'SAME' padding and GroupNorm(32) + ReLU, its stride-16 map projected 1x1 to the width;
                                                  dpt.embeddings.backbone.bit.*, dpt.embeddings.projection
                large: a 16 x 16 stride-16 patch conv 3 -> width; dpt.embeddings.patch_embeddings.projection
  ViT           a [CLS] token and learned position embeddings (a 24 x 24 grid, bilinearly resized to another input's
                grid), pre-norm layers (GELU MLP, LayerNorm eps 1e-12): hybrid ViT-B/16 (12 layers, width 768, 12
                heads, MLP 3072), large ViT-L/16 (24 layers, width 1024, 16 heads, MLP 4096);
                                                  dpt.embeddings.{cls_token, position_embeddings}, dpt.encoder.layer.N
  reassemble    four maps at strides 4, 8, 16, 32: the tokens after the read layers (0-based; hybrid 8, 11; large 5,
                11, 17, 23), each with its [CLS] token concatenated and projected back ("project" readout: Linear
                2C -> C + GELU), 1x1 to the neck width and resized by the reassemble factor (> 1: a transposed conv of
                kernel = stride = factor; 1: none; 0.5: a 3x3 stride-2 conv): large factors 4, 2, 1, 0.5, widths 256,
                512, 1024, 1024; the hybrid takes its first two maps from BiT stages 1 and 2 as they are (transformers'
                neck_ignore_stages [0, 1]) and reassembles the last two at factors 1, 0.5 to 768, 768;
                                                  neck.reassemble_stage.{readout_projects, layers}.N
  fusion        each map 3x3 to 256 channels (neck.convs), then from the coarsest: + residual unit(skip), residual
                unit, 2x bilinear upsampling (align_corners), 1x1 conv; neck.fusion_stage.layers.0-3
  head          conv 3x3 256 -> 128, 2x upsampling, conv 3x3 128 -> 32, ReLU, conv 1x1 32 -> 1, ReLU: relative
                inverse depth at the input size (no projection before it: add_projection is false in both files);
                                                  head.head.{0, 2, 4}
`dpt.layernorm` is in the files but the depth head reads the encoder's layer outputs before it, as transformers does.
A file of the other preset is refused by its stem's keys, naming what it holds and where the expected one comes from.

Input, as ControlNet++'s reward step and both releases' evaluation (Intel/dpt-large's preprocessor_config.json: size
384, bilinear, mean = std = 0.5, keep_aspect_ratio false): RGB in [0, 1] resized to 384 x 384 (bilinear, antialiased
as PIL's resize), normalised with mean = std = 0.5; the predicted depth resized back (bilinear) to the control's size
and each sample divided by its own maximum (ref.control_losses.max_normalised), so it lies in [0, 1] as the
max-normalised control. The releases' evaluation (ControlNet++ eval/eval.py:251-256, InnerControl eval/eval.py:230-235)
resizes 8-bit images (PIL), divides the depth by its maximum at 384 px, truncates that map to 8 bits, resizes it to
512 px (PIL, bilinear) and rounds it to 8 bits: the same up to those 8-bit roundings and the maximum taken before
rather than after the bilinear resize.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.annotator_weights import load_state, read_task_weights
from ref.control_losses import max_normalised

INPUT_SIZE = 384
HEAD_CHANNELS = 32


@dataclass(frozen=True)
class DPTConfig:
    hybrid: bool = True  # the BiT stem (DPT-Hybrid) or a patch conv (DPT-Large)
    image_size: int = 384  # the position embeddings' grid is image_size / patch_size
    patch_size: int = 16  # the patch conv's stride, or the BiT stem's total stride
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    mlp_size: int = 3072
    stem_channels: int = 64  # stem_channels .. groups: the BiT stem
    stage_depths: tuple = (3, 4, 9)
    stage_channels: tuple = (256, 512, 1024)
    groups: int = 32  # GroupNorm groups in the BiT stem
    read_layers: tuple = (8, 11)  # ViT layers whose tokens feed the last len(read_layers) reassemble stages
    reassemble_factors: tuple = (1, 0.5)  # one per read layer
    neck_channels: tuple = (256, 512, 768, 768)
    fusion_channels: int = 256


_TINY = dict(hidden_size=32, heads=2, mlp_size=64, fusion_channels=16)  # tests only
DPT_CONFIGS = {
    "dpt-hybrid-midas": DPTConfig(),
    "dpt-large": DPTConfig(hybrid=False, hidden_size=1024, layers=24, heads=16, mlp_size=4096,
                           read_layers=(5, 11, 17, 23), reassemble_factors=(4, 2, 1, 0.5),
                           neck_channels=(256, 512, 1024, 1024)),
    "tiny-hybrid": DPTConfig(**_TINY, layers=3, stem_channels=8, stage_depths=(1, 1, 2), stage_channels=(16, 32, 64),
                             groups=4, read_layers=(1, 2), neck_channels=(16, 32, 32, 32)),
    "tiny-large": DPTConfig(**_TINY, hybrid=False, layers=5, read_layers=(0, 2, 3, 4),
                            reassemble_factors=(4, 2, 1, 0.5), neck_channels=(8, 16, 32, 32)),
}

# Each stem's key prefix (hybrid: True), which tells the two files apart, and what to call its file in an error.
STEMS = {True: ("dpt.embeddings.backbone.", "DPT-Hybrid depth weights (Intel/dpt-hybrid-midas, the reward model: "
                                            "dpt.embeddings.backbone.bit.* keys)"),
         False: ("dpt.embeddings.patch_embeddings.", "DPT-Large depth weights (model.safetensors of Intel/dpt-large, "
                                                     "from huggingface.co/Intel/dpt-large: dpt.embeddings."
                                                     "patch_embeddings.* keys)")}


# ---------------------------------------------------------------------------------------------------------------------
# BiT stem (transformers' BitBackbone, layer_type "bottleneck", global_padding "SAME")
# ---------------------------------------------------------------------------------------------------------------------

def pad_same(x, kernel_size, stride):
    """TF 'SAME' padding: the output has ceil(size / stride) pixels; an odd total puts the extra pixel at the end."""
    pads = []
    for size in reversed(x.shape[-2:]):  # F.pad's order: last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def divisible_channels(value, divisor=8):
    """BiT's bottleneck width: `value` rounded to a multiple of 8, never below 90% of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class StandardisedConv2d(nn.Conv2d):
    """Conv without bias whose filters are standardised on the fly (Qiao et al. 2019; BiT): w -> (w - mean) / sqrt(var
    + 1e-8) per output channel, the biased variance over in_channels x k x k; TF 'SAME' padding."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, bias=False)

    def forward(self, x):
        flat = self.weight.flatten(1)  # (C_out, C_in k k)
        mean, variance = flat.mean(1, keepdim=True), flat.var(1, unbiased=False, keepdim=True)
        weight = ((flat - mean) / torch.sqrt(variance + 1e-8)).reshape_as(self.weight)
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), weight, stride=self.stride)


class ConvNorm(nn.Module):
    """Standardised conv, then GroupNorm (eps 1e-5). The shortcut projection of a stage's first bottleneck."""

    def __init__(self, in_channels, out_channels, stride, groups):
        super().__init__()
        self.conv = StandardisedConv2d(in_channels, out_channels, 1, stride)
        self.norm = nn.GroupNorm(groups, out_channels)

    def forward(self, x):
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """ReLU(x' + GN(conv1x1(ReLU(GN(conv3x3(ReLU(GN(conv1x1(x))))))))), the stride on the 3x3 conv (ResNet v1.5);
    x' = x, or its projection (`downsample`) in a stage's first block. (B, C_in, H, W) -> (B, C_out, H/s, W/s)"""

    def __init__(self, in_channels, out_channels, stride, groups, first):
        super().__init__()
        middle = divisible_channels(out_channels / 4)
        self.downsample = ConvNorm(in_channels, out_channels, stride, groups) if first else None
        self.conv1 = StandardisedConv2d(in_channels, middle, 1)
        self.norm1 = nn.GroupNorm(groups, middle)
        self.conv2 = StandardisedConv2d(middle, middle, 3, stride)
        self.norm2 = nn.GroupNorm(groups, middle)
        self.conv3 = StandardisedConv2d(middle, out_channels, 1)
        self.norm3 = nn.GroupNorm(groups, out_channels)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.norm1(self.conv1(x)))
        h = F.relu(self.norm2(self.conv2(h)))
        return F.relu(self.norm3(self.conv3(h)) + shortcut)


class BiTStem(nn.Module):
    """image (B, 3, H, W) -> the outputs of the three stages [(B, C_s, H / 4 / 2^s, W / 4 / 2^s)], s = 0, 1, 2."""

    def __init__(self, config):
        super().__init__()
        self.embedder = nn.Module()
        self.embedder.convolution = StandardisedConv2d(3, config.stem_channels, 7, stride=2)
        self.embedder.norm = nn.GroupNorm(config.groups, config.stem_channels)
        self.encoder = nn.Module()
        self.encoder.stages = nn.ModuleList()
        in_channels = config.stem_channels
        for index, (depth, channels) in enumerate(zip(config.stage_depths, config.stage_channels)):
            stage = nn.Module()
            stage.layers = nn.Sequential(*(Bottleneck(in_channels if i == 0 else channels, channels,
                                                      stride=2 if index > 0 and i == 0 else 1, groups=config.groups,
                                                      first=i == 0) for i in range(depth)))
            self.encoder.stages.append(stage)
            in_channels = channels

    def forward(self, image):
        x = F.relu(self.embedder.norm(self.embedder.convolution(image)))  # (B, C_stem, H/2, W/2)
        x = F.max_pool2d(pad_same(x, 3, 2), kernel_size=3, stride=2)  # (B, C_stem, H/4, W/4); pads zeros after ReLU
        outputs = []
        for stage in self.encoder.stages:
            x = stage.layers(x)
            outputs.append(x)
        return outputs


# ---------------------------------------------------------------------------------------------------------------------
# ViT encoder on the stem's or the patch conv's tokens
# ---------------------------------------------------------------------------------------------------------------------

class Dense(nn.Module):
    """A Linear under the name `dense`, as the file nests it."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)

    def forward(self, x):
        return self.dense(x)


class SelfAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v over all tokens, `heads` heads. (B, T, C) -> (B, T, C), before the output dense."""

    def __init__(self, hidden_size, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden_size, hidden_size) for _ in range(3))

    def forward(self, x):
        batch, tokens, channels = x.shape
        q, k, v = (projection(x).reshape(batch, tokens, self.heads, -1).transpose(1, 2)
                   for projection in (self.query, self.key, self.value))  # (B, heads, T, d) each
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, channels)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attention(LN(x)), then + MLP(LN(.)) with GELU. (B, T, C) -> (B, T, C)"""

    def __init__(self, config):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.attention = nn.Module()
        self.attention.attention = SelfAttention(config.hidden_size, config.heads)
        self.attention.output = Dense(config.hidden_size, config.hidden_size)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.intermediate = Dense(config.hidden_size, config.mlp_size)
        self.output = Dense(config.mlp_size, config.hidden_size)

    def forward(self, x):
        x = x + self.attention.output(self.attention.attention(self.layernorm_before(x)))
        return x + self.output(F.gelu(self.intermediate(self.layernorm_after(x))))


class ViT(nn.Module):
    """image (B, 3, H, W) -> the maps the neck takes as they are (the hybrid's BiT stages 1 and 2; none for the patch
    conv), the tokens (B, 1 + hw, C) after each read layer, and the patch grid (h, w) = (H/16, W/16)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        grid = config.image_size // config.patch_size
        self.embeddings = nn.Module()
        if config.hybrid:
            self.embeddings.backbone = nn.Module()
            self.embeddings.backbone.bit = BiTStem(config)
            self.embeddings.projection = nn.Conv2d(config.stage_channels[-1], config.hidden_size, 1)
        else:
            self.embeddings.patch_embeddings = nn.Module()
            self.embeddings.patch_embeddings.projection = nn.Conv2d(3, config.hidden_size, config.patch_size,
                                                                    stride=config.patch_size)
        self.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.embeddings.position_embeddings = nn.Parameter(torch.zeros(1, 1 + grid * grid, config.hidden_size))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=1e-12)  # in the file; unused by the depth head

    def patches(self, image):
        """-> (the stem maps kept for the neck, the patch embeddings (B, C, H/16, W/16))"""
        if not self.config.hybrid:
            return [], self.embeddings.patch_embeddings.projection(image)
        stages = self.embeddings.backbone.bit(image)
        return stages[:-1], self.embeddings.projection(stages[-1])

    def position_embeddings(self, height, width):
        """The learned embeddings, the patch grid bilinearly resized to height x width. -> (1, 1 + HW, C)"""
        embeddings = self.embeddings.position_embeddings
        grid = math.isqrt(embeddings.shape[1] - 1)
        if (height, width) == (grid, grid):
            return embeddings
        patches = embeddings[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        patches = F.interpolate(patches, size=(height, width), mode="bilinear", align_corners=False)
        return torch.cat([embeddings[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, image):
        stem_maps, patches = self.patches(image)  # [(B, C_s, ., .)], (B, C, H/16, W/16)
        height, width = patches.shape[-2:]
        x = torch.cat([self.embeddings.cls_token.expand(len(image), -1, -1), patches.flatten(2).transpose(1, 2)], 1)
        x = x + self.position_embeddings(height, width)  # (B, 1 + HW, C)
        tokens = []
        for index, layer in enumerate(self.encoder.layer):
            x = layer(x)
            if index in self.config.read_layers:
                tokens.append(x)
        return stem_maps, tokens, (height, width)


# ---------------------------------------------------------------------------------------------------------------------
# Neck (reassemble + fusion), depth head and weights
# ---------------------------------------------------------------------------------------------------------------------

class ResidualUnit(nn.Module):
    """x + conv(ReLU(conv(ReLU(x)))), 3x3 convs with bias (no BatchNorm in the depth model)."""

    def __init__(self, channels):
        super().__init__()
        self.convolution1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.convolution2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.convolution2(F.relu(self.convolution1(F.relu(x))))


class FusionBlock(nn.Module):
    """(coarser fused map, skip) -> x = fused + unit1(skip) (skip resized if its size differs), unit2(x), 2x bilinear
    upsampling (align_corners), 1x1 conv. The coarsest block has no fused input. (B, F, h, w) -> (B, F, 2h, 2w)"""

    def __init__(self, channels):
        super().__init__()
        self.projection = nn.Conv2d(channels, channels, 1)
        self.residual_layer1 = ResidualUnit(channels)  # unused by the first (coarsest) block, present in the file
        self.residual_layer2 = ResidualUnit(channels)

    def forward(self, skip, fused=None):
        if fused is None:
            x = skip
        else:
            if skip.shape[-2:] != fused.shape[-2:]:
                skip = F.interpolate(skip, size=fused.shape[-2:], mode="bilinear", align_corners=False)
            x = fused + self.residual_layer1(skip)
        x = F.interpolate(self.residual_layer2(x), scale_factor=2, mode="bilinear", align_corners=True)
        return self.projection(x)


def resampling(channels, factor):
    """Reassemble's resizing by `factor`: up by a transposed conv of kernel = stride = factor, none at 1, down by a
    3x3 conv of stride 1 / factor (transformers DPTReassembleLayer). (B, C, h, w) -> (B, C, h factor, w factor)"""
    if factor > 1:
        return nn.ConvTranspose2d(channels, channels, int(factor), stride=int(factor))
    if factor == 1:
        return nn.Identity()
    return nn.Conv2d(channels, channels, 3, stride=round(1 / factor), padding=1)


class Neck(nn.Module):
    """The hybrid's BiT maps + the read tokens -> the finest fused map (B, F, H/2, W/2)."""

    def __init__(self, config):
        super().__init__()
        hidden, stem_maps = config.hidden_size, len(config.neck_channels) - len(config.read_layers)
        self.reassemble_stage = nn.Module()
        self.reassemble_stage.readout_projects = nn.ModuleList(nn.Identity() for _ in range(stem_maps))  # as they are
        self.reassemble_stage.layers = nn.ModuleList(nn.Identity() for _ in range(stem_maps))
        for channels, factor in zip(config.neck_channels[stem_maps:], config.reassemble_factors):
            self.reassemble_stage.readout_projects.append(nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU()))
            layer = nn.Module()
            layer.projection = nn.Conv2d(hidden, channels, 1)
            layer.resize = resampling(channels, factor)
            self.reassemble_stage.layers.append(layer)
        self.convs = nn.ModuleList(nn.Conv2d(channels, config.fusion_channels, 3, padding=1, bias=False)
                                   for channels in config.neck_channels)
        self.fusion_stage = nn.Module()
        self.fusion_stage.layers = nn.ModuleList(FusionBlock(config.fusion_channels) for _ in config.neck_channels)

    def reassemble(self, tokens, index, grid):
        """tokens (B, 1 + hw, C) -> (B, C_index, h', w'): the [CLS] readout projected into every patch token."""
        cls, patches = tokens[:, :1], tokens[:, 1:]
        patches = self.reassemble_stage.readout_projects[index](torch.cat([patches, cls.expand_as(patches)], -1))
        maps = patches.transpose(1, 2).reshape(len(tokens), -1, *grid)  # (B, C, h, w)
        layer = self.reassemble_stage.layers[index]
        return layer.resize(layer.projection(maps))

    def forward(self, stem_maps, tokens, grid):
        first = len(stem_maps)  # the token maps follow the stem's
        maps = stem_maps + [self.reassemble(x, first + index, grid) for index, x in enumerate(tokens)]
        maps = [conv(x) for conv, x in zip(self.convs, maps)]  # (B, F, ., .): strides 4, 8, 16, 32
        fused = None
        for block, skip in zip(self.fusion_stage.layers, reversed(maps)):
            fused = block(skip, fused)
        return fused


def read_weights(path, hybrid):
    """The DPT state dict in `path` (ref.annotator_weights.read_task_weights: a file of another task refused by
    name), refused by name when it holds the other preset's stem. -> ({key: tensor}, {key: the key in the file})"""
    state, original = read_task_weights(path, "dpt")
    other_prefix, other = STEMS[not hybrid]
    if any(key.startswith(other_prefix) for key in state):
        raise ValueError(f"{path} holds {other}, not {STEMS[hybrid][1]}")
    return state, original


class DPTDepth(nn.Module):
    """image (B, 3, H, W), RGB in [0, 1] -> max-normalised relative inverse depth (B, 1, H', W') in [0, 1],
    (H', W') = `size` or the image's own. Frozen, eval mode, differentiable.
    weights: a DPTForDepthEstimation file of the preset (pytorch_model.bin / model.safetensors of
    Intel/dpt-hybrid-midas or Intel/dpt-large), read and checked before the network is built; None leaves random
    weights (tests only). config: a DPT_CONFIGS name."""

    def __init__(self, weights=None, config="dpt-hybrid-midas"):
        super().__init__()
        config = DPT_CONFIGS[config]
        state = None if weights is None else read_weights(weights, config.hybrid)
        self.dpt = ViT(config)
        self.neck = Neck(config)
        features = config.fusion_channels
        self.head = nn.Module()
        self.head.head = nn.Sequential(nn.Conv2d(features, features // 2, 3, padding=1),
                                       nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                       nn.Conv2d(features // 2, HEAD_CHANNELS, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(HEAD_CHANNELS, 1, 1), nn.ReLU())
        if state is not None:
            load_state(self, weights, *state)
        self.eval().requires_grad_(False)

    def predicted_depth(self, pixels):
        """transformers' `predicted_depth`: normalised pixels (B, 3, H, W) -> (B, H, W), H and W multiples of 16."""
        stem_maps, tokens, grid = self.dpt(pixels)
        return self.head.head(self.neck(stem_maps, tokens, grid)).squeeze(1)

    def forward(self, image, size=None):
        pixels = F.interpolate(image, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                               antialias=True)
        depth = self.predicted_depth((pixels - 0.5) / 0.5).unsqueeze(1)  # (B, 1, 384, 384)
        depth = F.interpolate(depth, size=size or image.shape[-2:], mode="bilinear", align_corners=False)
        return max_normalised(depth)
