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

The InnerControl release's align models (its AggregationNetwork files) are this network with 3 output channels, a
64 x 64 output and, by default, no timestep input: `release_align_model` imports them (last section).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.checkpoints import check_state_fits, misfit_line

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
    conv (the shortcut's included). (B, C_in, R, R), (B, D_t) -> (B, P, R, R).

    t_emb_dim None: no timestep term, the block ignores t. This is what the InnerControl release's align models compute
    with their default `bottleneck_sequential=True` (train/aggregation_network.py:155): each block is wrapped in an
    nn.Sequential (:173-174), a Sequential is called with the features alone (:229-232), so the block's `emb` is None
    and its timestep addition is skipped (:121); its emb_layers weights are stored but never used."""

    def __init__(self, in_channels, out_channels, t_emb_dim):
        super().__init__()
        bottleneck_channels = out_channels // 4
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=False)
        self.norm1 = group_norm(bottleneck_channels)
        self.timestep_projection = None if t_emb_dim is None else nn.Linear(t_emb_dim, bottleneck_channels)
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
        if self.timestep_projection is not None:
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
    t_emb_dim: width D_t of the UNet's timestep embedding, which the caller passes in (the probe has no embedder);
        None: the probe does not read t (TimestepBottleneck; the release's align models).
    out_channels: C_out (1 for depth and edges, 3 in the release's align models; the number of classes for segmentation
        with output="logits").
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


def tanh_reading(estimate, control_channels):
    """A tanh probe's estimate (B, C_out, R, R) read as a control of `control_channels` channels in [0, 1]: (H + 1) / 2
    (InnerControl release, train/reward_control_aligned.py:1836); several channels against a one-channel control
    averaged into one map, as the release reads its 3-channel align models for depth (:1841) and lineart (:1848; for
    hed, :1855-1856 compares each channel with the label instead). -> (B, 1 | C_out, R, R)"""
    reading = (estimate + 1) / 2
    if control_channels == 1 and reading.shape[1] > 1:
        return reading.mean(1, keepdim=True)
    return reading


# ---------------------------------------------------------------------------------------------------------------------
# The InnerControl release's align models (train/aggregation_network.py, read by train/helpers.py)
# ---------------------------------------------------------------------------------------------------------------------
# The file (helpers.py:349-365): torch.save of {"config": {...}, "aggregation_network": state dict, ...}; the network is
# AggregationNetwork(projection_dim=config["projection_dim"], feature_dims=config["dims"],
# save_timestep=config["save_timestep"], **config["aggregation_kwargs"]), loaded strictly. Its keys:
#   bottleneck_layers.{l}[.0].conv{1,2,3}.weight, .conv{1,2,3}.norm.{weight,bias}   (.0: the nn.Sequential wrap, :174)
#   bottleneck_layers.{l}[.0].shortcut.weight, .shortcut.norm.{weight,bias}        (1x1 conv when C_l != P, :64-72)
#   bottleneck_layers.{l}[.0].emb_layers.{weight,bias}                              (Linear(1280, P/4), :111-112)
#   mixing_weights                                                                  (one per map and timestep, :181)
#   output_head.{0,2,4}.{weight,bias}                                               (3x3, 3x3, 1x1 convs, :196-202)

RELEASE_RESOLUTION = 64  # every map resized to 64 x 64 (helpers.py:315, the size reward_control_aligned.py:1830 uses)
RELEASE_T_EMB_DIM = 1280  # BottleneckBlock's emb_channels (aggregation_network.py:57), which AggregationNetwork keeps
# AggregationNetwork's keyword defaults (aggregation_network.py:152-155)
RELEASE_DEFAULTS = dict(use_output_head=False, output_head_channels=3, output_head_act=True, bottleneck_sequential=True)
RELEASE_CONFIG_FIELDS = ("dims", "projection_dim", "save_timestep")  # what helpers.py:357-362 reads from the config
RELEASE_BLOCK_KEYS = {
    **{f"conv{i}.weight": f"conv{i}.weight" for i in (1, 2, 3)},
    **{f"conv{i}.norm.{name}": f"norm{i}.{name}" for i in (1, 2, 3) for name in ("weight", "bias")},
    "shortcut.weight": "shortcut.0.weight", "shortcut.norm.weight": "shortcut.1.weight",
    "shortcut.norm.bias": "shortcut.1.bias",
    "emb_layers.weight": "timestep_projection.weight", "emb_layers.bias": "timestep_projection.bias",
}


def is_release_align_model(contents):
    """Whether a file's contents are an align model of the InnerControl release (helpers.py:352-365's layout)."""
    return isinstance(contents, dict) and isinstance(contents.get("config"), dict) and isinstance(
        contents.get("aggregation_network"), dict)


def release_settings(contents, path):
    """The AggregationNetwork settings of a release align model, those this project cannot read refused by a
    ValueError naming the file. -> (feature channels C_l, P, C_out, time-conditioned)"""
    config = contents["config"]
    missing = [name for name in RELEASE_CONFIG_FIELDS if name not in config]
    if missing:
        raise ValueError(f"{path} is a release align model whose config lacks {', '.join(missing)} (helpers.py:357-362 "
                         f"builds the network from them)")
    settings = dict(RELEASE_DEFAULTS, **config.get("aggregation_kwargs", {}))
    if not settings["use_output_head"]:
        raise ValueError(f"{path} is a release aggregation network without its output head (use_output_head False): "
                         f"it gives features, not a control map")
    if not settings["output_head_act"]:
        raise ValueError(f"{path} is a release align model without the tanh on its output (output_head_act False); "
                         f"the release reads its align models as tanh maps (reward_control_aligned.py:1836-1838)")
    if len(config["save_timestep"]) != 1:
        raise ValueError(f"{path} mixes the features of {len(config['save_timestep'])} timesteps (save_timestep "
                         f"{config['save_timestep']}); the release feeds its align model one UNet pass")
    return ([int(c) for c in config["dims"]], int(config["projection_dim"]), int(settings["output_head_channels"]),
            not settings["bottleneck_sequential"])


def release_key(key, sequential):
    """ReadoutProbe's name of a release align model's key; None for the time projection of a sequential model, which
    its forward never calls. A key of no known part keeps its name (and is then named as unexpected)."""
    if key == "mixing_weights":
        return "mixing_logits"
    if key.startswith("output_head."):
        return "head." + key.removeprefix("output_head.")
    if not key.startswith("bottleneck_layers."):
        return key
    _, layer, *rest = key.split(".")
    if sequential and rest[0] == "0":  # inside the nn.Sequential wrap
        rest = rest[1:]
    block_key = RELEASE_BLOCK_KEYS.get(".".join(rest), ".".join(rest))
    if sequential and block_key.startswith("timestep_projection."):
        return None
    return f"bottlenecks.{layer}.{block_key}"


def release_align_model(contents, path, load=True):
    """The InnerControl release's align model in `contents` (a file read by ref.checkpoints.read_checkpoint) as a
    frozen ReadoutProbe that computes what its AggregationNetwork computes: the release's C_out (3) tanh head, 64 x 64
    output, its feature maps (attention taps in the release's runs), and a 1280-d time embedding or, with
    bottleneck_sequential (the release's default), none. Settings this project cannot read and weights that do not
    fit the file's own config raise a ValueError naming the file. load False: the same checks, the probe left on the
    meta device without its weights (ref.trainer's FLOP count). -> ReadoutProbe"""
    channels, width, out_channels, timed = release_settings(contents, path)
    names = {key: release_key(key, sequential=not timed) for key in contents["aggregation_network"]}
    original = {ours: key for key, ours in names.items() if ours is not None}  # {our key: the release's key}
    state = {ours: contents["aggregation_network"][key] for ours, key in original.items()}
    with torch.device("meta"):  # no random init of weights that are overwritten next
        probe = ReadoutProbe(channels, RELEASE_T_EMB_DIM if timed else None, out_channels, RELEASE_RESOLUTION, width)
    try:
        check_state_fits(probe, state, original)
    except ValueError as error:
        raise ValueError(f"{path}: the release align model's weights do not fit its own config: "
                         f"{misfit_line(error)}") from None
    if load:
        probe.load_state_dict(state, assign=True)
    return probe.requires_grad_(False).eval()
