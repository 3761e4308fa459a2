"""DiT / SiT (Peebles & Xie 2023; Ma et al. 2024) with the Internal Guidance head (Zhou et al., arXiv 2512.24176).

DiT and SiT are one network; they differ in the objective (DDPM eps vs flow-matching velocity) and in what `t` means,
which the network never sees: it embeds whatever `t` it is given (DiT: the integer step in [0, 1000); the IG SiT
release: t in [0, 1], t = 0 data, fed as is; the official SiT: t in [0, 1], t = 0 noise, see `reversed_time`).
SiT-X/p as the IG release trains it is `MODELS["SiT-X/p"]()`, the same network as `MODELS["DiT-X/p"]()`; the
official DiT and SiT checkpoints need learn_sigma=True.

Internal Guidance adds an intermediate head: a separate copy of the final layer reading the tokens after block k. It is
trained on the same target (weight lambda = 0.5); sampling extrapolates D = D_i + w (D_f - D_i). Both outputs come from
one forward pass, `forward(x, t, y) -> (final, intermediate)`.

State-dict keys follow the official checkpoints (facebookresearch/DiT, willisma/SiT), so their weights load as they
are; the IG release (CVL-UESTC/Internal-Guidance, SiT/models/sit.py) calls the head `final_layer_xr`, renamed on load
by `canonical_key`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ref.checkpoints import check_state_fits, read_checkpoint, unwrap_state


def modulate(x, shift, scale):
    """adaLN: per-sample shift and scale (N, D), broadcast over the tokens of x (N, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings: patches, positions, timesteps, labels
# ---------------------------------------------------------------------------------------------------------------------

def sincos_pos_embed(dim, grid_size):
    """Fixed 2D sin-cos positions (MAE, DiT) of a grid_size x grid_size token grid in raster order -> (T, D).

    Channels [0, D/2) encode the column, [D/2, D) the row, each as [sin(pos w_i), cos(pos w_i)] with
    w_i = 10000^(-i / (D/4)), i < D/4."""
    if dim % 4:
        raise ValueError(f"hidden size must be a multiple of 4 for 2D sin-cos positions, got {dim}")
    omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    index = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(index, index, indexing="ij")  # (G, G) each

    def embed_1d(position):
        angles = position.reshape(-1, 1) * omega  # (T, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (T, D/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (T, D)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: a stride-p convolution. (N, C, H, W) -> (N, T, D), T = HW / p^2."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """t (N,) -> (N, D): 256 sinusoidal features [cos(t f_i), sin(t f_i)], f_i = 10000^(-i/128), then an MLP."""

    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # (F/2,)
        angles = t.float()[:, None] * freqs  # (N, F/2)
        frequencies = torch.cat([angles.cos(), angles.sin()], dim=1)  # (N, F)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class label (N,) -> (N, D). Label `num_classes` is the null label of classifier-free guidance; the table has
    that row only for a model trained with label dropout, as in the official checkpoints."""

    def __init__(self, num_classes, hidden_size, with_null_label):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(with_null_label), hidden_size)

    def forward(self, y):
        return self.embedding_table(y)  # (N, D)


# ---------------------------------------------------------------------------------------------------------------------
# Transformer blocks with adaLN-Zero (DiT Sec. 3.2)
# ---------------------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention; qkv packs (3, heads, head_dim) along its output, as timm and the checkpoints do."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads)  # (N, T, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, D/H)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(n, tokens, dim))  # (N, T, D)


class MLP(nn.Module):
    """Token-wise MLP with tanh-approximated GELU."""

    def __init__(self, hidden_size, mlp_hidden_size):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))  # (N, T, D)


class DiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning c regresses a shift, a scale and a gate for each of attention and MLP. The
    gates start at zero, so every block starts as the identity."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_attn.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_attn, scale_attn))  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """LayerNorm (no affine) -> adaLN shift and scale from c -> Linear to the p*p*C_out values of each patch.
    The IG intermediate head is a second instance with its own weights."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)


# ---------------------------------------------------------------------------------------------------------------------
# DiT / SiT with the optional IG intermediate head
# ---------------------------------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Class-conditional DiT / SiT on square (C, input_size, input_size) inputs.

    intermediate_block: k, the 1-indexed block whose output tokens feed the IG intermediate head (paper: 4 of 12 for
        SiT-B/2, 8 for L and XL; see IG_HEAD_BLOCK); None gives a plain DiT / SiT whose second output is None.
    learn_sigma: DiT's learned variance doubles the output channels (needed to load the official DiT and SiT
        checkpoints); forward keeps the first C channels, the prediction, and drops the variance ones, as SiT does,
        unless asked for them (with_variance, DiT's sampler).
    class_dropout_prob: label dropout rate of CFG training (applied by the caller: ref.losses.drop_labels with
        null label num_classes); > 0 gives the embedding table the null label's row.
    gradient_checkpointing: recompute each block in the backward pass instead of storing its activations.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, class_dropout_prob=0.1, learn_sigma=False, intermediate_block=None,
                 gradient_checkpointing=False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not a multiple of the patch size {patch_size}")
        if intermediate_block is not None and not 1 <= intermediate_block <= depth:
            raise ValueError(f"intermediate_block is 1-indexed in [1, {depth}] or None, got {intermediate_block}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes  # also the index of the null label
        self.class_dropout_prob = class_dropout_prob
        self.intermediate_block = intermediate_block
        self.gradient_checkpointing = gradient_checkpointing

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        grid_positions = sincos_pos_embed(hidden_size, input_size // patch_size)[None]  # (1, T, D)
        self.pos_embed = nn.Parameter(grid_positions, requires_grad=False)  # fixed; a parameter as in the checkpoints
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, with_null_label=class_dropout_prob > 0)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if intermediate_block is None:
            self.intermediate_head = None
        else:
            self.intermediate_head = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """As the official code: Xavier-uniform linear layers (the patch convolution seen as one), N(0, 0.02) label
        table and timestep MLP, and adaLN-Zero: zero modulation in every block and zero output layers, the IG head
        included (as in the SiT release), so the model starts as the zero function."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        patch_weight = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_layers = [block.adaLN_modulation[-1] for block in self.blocks]
        for head in (self.final_layer, self.intermediate_head):
            if head is not None:
                zero_layers += [head.adaLN_modulation[-1], head.linear]
        for layer in zero_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, patches, channels):
        """(N, T, p*p*C_out) -> (N, channels, H, W): patches back in raster order, the first `channels` of C_out."""
        n, p, grid = patches.shape[0], self.patch_size, self.input_size // self.patch_size
        image = patches.reshape(n, grid, grid, p, p, self.out_channels)  # (N, G, G, p, p, C_out)
        image = image.permute(0, 5, 1, 3, 2, 4)  # (N, C_out, G, p, G, p)
        return image.reshape(n, self.out_channels, grid * p, grid * p)[:, :channels]  # (N, channels, H, W)

    def forward(self, x, t, y, with_variance=False):
        """x (N, C, H, W), t (N,), y (N,) labels (num_classes = null) -> (final, intermediate), each (N, C, H, W);
        intermediate is None without the IG head. with_variance: (N, 2C, H, W) each for a learn_sigma model, the
        prediction then the learned-variance values (ref.schedules.DDPMSchedule.learned_log_variance)."""
        channels = self.out_channels if with_variance else self.in_channels
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        intermediate = None
        for index, block in enumerate(self.blocks, start=1):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, use_reentrant=False)  # (N, T, D)
            else:
                tokens = block(tokens, c)  # (N, T, D)
            if index == self.intermediate_block:
                intermediate = self.unpatchify(self.intermediate_head(tokens, c), channels)  # (N, C, H, W)
        final = self.unpatchify(self.final_layer(tokens, c), channels)  # (N, C, H, W)
        return final, intermediate


# ---------------------------------------------------------------------------------------------------------------------
# Size presets (DiT Table 1); SiT uses the same ones, under its own names
# ---------------------------------------------------------------------------------------------------------------------

DIT_MODELS = {
    "DiT-S/2": lambda **kwargs: DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs),
    "DiT-S/4": lambda **kwargs: DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs),
    "DiT-S/8": lambda **kwargs: DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs),
    "DiT-B/2": lambda **kwargs: DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs),
    "DiT-B/4": lambda **kwargs: DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs),
    "DiT-B/8": lambda **kwargs: DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs),
    "DiT-L/2": lambda **kwargs: DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs),
    "DiT-L/4": lambda **kwargs: DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs),
    "DiT-L/8": lambda **kwargs: DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs),
    "DiT-XL/2": lambda **kwargs: DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs),
    "DiT-XL/4": lambda **kwargs: DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs),
    "DiT-XL/8": lambda **kwargs: DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs),
}
MODELS = {**DIT_MODELS, **{"SiT" + name[len("DiT"):]: factory for name, factory in DIT_MODELS.items()}}

# The paper's head position by depth: after block 4 of 12 (SiT-B/2; S, also 12 deep, by analogy), 8 for L and XL.
IG_HEAD_BLOCK = {12: 4, 24: 8, 28: 8}


def count_parameters(module):
    """All parameters, the fixed pos_embed included, as the official scripts print them (DiT-XL/2: 675,129,632)."""
    return sum(p.numel() for p in module.parameters())


def ig_head_overhead(model):
    """(parameters of the IG head, that number as a fraction of the model without the head)."""
    head = count_parameters(model.intermediate_head)
    return head, head / (count_parameters(model) - head)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------

IG_RELEASE_HEAD = "final_layer_xr."  # the IG release's name of the head, CVL-UESTC/Internal-Guidance SiT/models/sit.py
IG_RELEASE_HEAD_BLOCK = 8  # that SiT's encoder_depth default, for every size


def ig_release_head_block(checkpoint):
    """The block after which an IG-release checkpoint's head sits, from the training settings its train.py stores:
    encoder_depth of the SiT release's args (an argparse.Namespace under "args") or of the LightningDiT release's
    yaml config (a dict under "config", its model.encoder_depth); None when the file carries neither.
    The SiT release's train.py records --encoder-depth (default 8) but builds SiT without it, at the class default
    IG_RELEASE_HEAD_BLOCK; the two agree unless that flag was changed. The LightningDiT release builds with it."""
    if not isinstance(checkpoint, dict):
        return None
    config = checkpoint.get("config")
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        return config["model"].get("encoder_depth")
    return getattr(checkpoint.get("args"), "encoder_depth", None)


def reversed_time(model):
    """An official SiT network (willisma/SiT: x_s = s x0 + (1 - s) eps, s = 0 noise, s = 1 data, velocity x0 - eps) in
    this repository's flow convention (t = 1 - s, velocity eps - x0): (x, t, y) -> (-velocity(x, 1 - t, y), None)."""
    def forward(x, t, y):
        final, _ = model(x, 1 - t, y)
        return -final, None
    return forward


def canonical_key(key):
    """A DiT / SiT / IG-release key (wrapper prefixes already stripped) -> ours."""
    return "intermediate_head." + key[len(IG_RELEASE_HEAD):] if key.startswith(IG_RELEASE_HEAD) else key


def load_checkpoint(model, checkpoint, prefer="ema", allow_missing_head=False):
    """Load a DiT / SiT / IG checkpoint into `model`, all or nothing.

    checkpoint: a path or a dict: a raw state dict or a training checkpoint {"ema": ..., "model": ..., ...}, from
        which `prefer` picks (falling back to the other). Wrapper prefixes are stripped and the IG release's head
        renamed (canonical_key).
    allow_missing_head: accept a plain DiT / SiT checkpoint in an IG model; the head keeps its fresh (zero) init.
    Missing keys, unexpected keys and shape mismatches raise a ValueError naming each of them, before anything is
    copied."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    state, file_key = unwrap_state(checkpoint, prefer)
    original_key = {canonical_key(key): file_key[key] for key in state}
    state = {canonical_key(key): value for key, value in state.items()}

    check_state_fits(model, state, original_key, ("intermediate_head.",) if allow_missing_head else ())
    model.load_state_dict(state, strict=False)  # completeness checked above
    return model
