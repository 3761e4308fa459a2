"""LightningDiT (Yao et al. 2025, hustvl/LightningDiT) with the Internal Guidance head (Zhou et al., arXiv 2512.24176).

LightningDiT is DiT with modernised blocks: RMSNorm, a SwiGLU feed-forward, 2D rotary positions on q and k (on top of
DiT's fixed sin-cos positions, which it keeps), optional qk-norm and an optional shift-free adaLN (`wo_shift`). The IG
paper's headline model is LightningDiT-XL/1 + IG on VA-VAE f16d32 latents (32 channels, 16 x 16 for 256 px, patch 1),
the head after block 8. The interface is ref.dit.DiT's: `forward(x, t, y) -> (final, intermediate)`, intermediate None
without the head.

Time convention. This project's flow time is t = 1 noise: x_t = (1 - t) x0 + t eps, the network predicts eps - x0. The
LightningDiT release runs the path the other way (t_release = 1 data, x_t = t_release x0 + (1 - t_release) eps, velocity
x0 - eps). The same x_t is t_release = 1 - t and the velocities differ in sign, so the released weights see the time
they were trained with when `LightningDiT.forward` embeds 1 - t and negates both outputs. That is the only adapter:
outside forward every time and every velocity is in the project's convention (the release's "CFG from
t_release = 0.19" is t <= 0.81 here).

State-dict keys follow the IG release (CVL-UESTC/Internal-Guidance, LightningDiT/models/lightningdit.py), the rotary
tables `feat_rope.freqs_cos/sin` included, so its checkpoints load as they are with ref.dit.load_checkpoint, which
renames its head `final_layer_xr` to `intermediate_head` as for the IG release's SiT.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ref import dit
from ref.dit import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, normalised in float32 (as the release's RMSNorm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def token_norm(dim, use_rmsnorm):
    """The block and head normalisation: RMSNorm, or DiT's LayerNorm without affine."""
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def modulate(x, shift, scale):
    """adaLN on x (N, T, D) with (N, D) shift and scale; shift None (the `wo_shift` blocks) scales only."""
    return x * (1 + scale.unsqueeze(1)) if shift is None else dit.modulate(x, shift, scale)


# ---------------------------------------------------------------------------------------------------------------------
# 2D rotary position embedding (VisionRotaryEmbeddingFast of EVA-02, as the LightningDiT release uses it)
# ---------------------------------------------------------------------------------------------------------------------

def rope_angles(rows, cols, head_dim, theta=10000.0):
    """Rotation angles of each token at (row, col): rows, cols (T,) -> (T, head_dim).

    Channels [0, head_dim/2) turn with the row, [head_dim/2, head_dim) with the column. Within a half of size
    A = head_dim/2, the pair of channels (2j, 2j+1) turns by position * f_j, f_j = theta^(-2j / A), j < A/2."""
    axis_dim = head_dim // 2
    frequencies = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim)  # (A/2,)

    def axis_angles(position):
        return (position.float()[:, None] * frequencies).repeat_interleave(2, dim=1)  # (T, A): f_0, f_0, f_1, ...

    return torch.cat([axis_angles(rows), axis_angles(cols)], dim=1)  # (T, head_dim)


def rotate_pairs(x):
    """(x_2j, x_2j+1) -> (-x_2j+1, x_2j): multiplication by i of each channel pair read as a complex number."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., head_dim/2, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x, cos, sin):
    """Turn each channel pair of x (..., T, head_dim) by its angle; cos, sin (T, head_dim)."""
    return x * cos + rotate_pairs(x) * sin


class GridRotaryEmbedding(nn.Module):
    """RoPE of a grid_size x grid_size token grid in raster order. The tables are buffers in the state dict
    (`freqs_cos`, `freqs_sin`, (T, head_dim)) because the release's checkpoints hold them."""

    def __init__(self, head_dim, grid_size):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D rotary positions need a head size that is a multiple of 4, got {head_dim}")
        index = torch.arange(grid_size)
        rows, cols = torch.meshgrid(index, index, indexing="ij")  # (G, G) each
        angles = rope_angles(rows.flatten(), cols.flatten(), head_dim)  # (T, head_dim)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())

    def forward(self, x):
        return apply_rope(x, self.freqs_cos, self.freqs_sin)  # (N, H, T, head_dim)


# ---------------------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention; q and k are optionally normalised per head (qk-norm: RMSNorm, or LayerNorm with
    affine when RMSNorm is off, as the release), then rotated by the RoPE tables."""

    def __init__(self, hidden_size, num_heads, qk_norm=False, use_rmsnorm=True):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        head_norm = (lambda: RMSNorm(head_dim)) if use_rmsnorm else (lambda: nn.LayerNorm(head_dim))
        self.q_norm = head_norm() if qk_norm else nn.Identity()
        self.k_norm = head_norm() if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, rope=None):
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads)  # (N, T, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, D/H)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(n, tokens, dim))  # (N, T, D)


def swiglu_hidden_size(hidden_size, mlp_ratio):
    """The release's rule: 2/3 of the GELU MLP's width, so the three matrices hold as many weights as its two
    (XL: 3072, L: 2730, B: 2048)."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


class SwiGLU(nn.Module):
    """w3(silu(a) * b) with (a, b) the two halves of w12(x) (Shazeer 2020)."""

    def __init__(self, hidden_size, ffn_size):
        super().__init__()
        self.w12 = nn.Linear(hidden_size, 2 * ffn_size)
        self.w3 = nn.Linear(ffn_size, hidden_size)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)  # 2 x (N, T, F)
        return self.w3(F.silu(gate) * value)  # (N, T, D)


class LightningDiTBlock(nn.Module):
    """adaLN-Zero block (DiT Sec. 3.2) with LightningDiT's parts. wo_shift: the conditioning regresses only a scale and
    a gate per branch (4D outputs instead of 6D)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, use_swiglu=True, use_rmsnorm=True,
                 wo_shift=False):
        super().__init__()
        self.wo_shift = wo_shift
        self.norm1 = token_norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qk_norm, use_rmsnorm)
        self.norm2 = token_norm(hidden_size, use_rmsnorm)
        if use_swiglu:
            self.mlp = SwiGLU(hidden_size, swiglu_hidden_size(hidden_size, mlp_ratio))
        else:
            self.mlp = dit.MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x, c, rope=None):
        if self.wo_shift:
            scale_attn, gate_attn, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_attn = shift_mlp = None
        else:
            shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_attn.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_attn, scale_attn), rope)  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(dit.FinalLayer):
    """DiT's final layer with LightningDiT's normalisation (RMSNorm when use_rmsnorm)."""

    def __init__(self, hidden_size, patch_size, out_channels, use_rmsnorm=True):
        super().__init__(hidden_size, patch_size, out_channels)
        self.norm_final = token_norm(hidden_size, use_rmsnorm)


# ---------------------------------------------------------------------------------------------------------------------
# LightningDiT with the optional IG intermediate head
# ---------------------------------------------------------------------------------------------------------------------

class LightningDiT(nn.Module):
    """Class-conditional LightningDiT on square (C, input_size, input_size) latents; defaults: XL/1 on f16d32 latents
    as `lightningdit_xl_vavae_f16d32.yaml` configures it (SwiGLU, RoPE, RMSNorm on; qk-norm and wo_shift off).

    intermediate_block: k, the 1-indexed block whose tokens feed the IG head (8 in the IG release); None gives a
        plain LightningDiT whose second output is None.
    class_dropout_prob: > 0 gives the label table the CFG null label's row (label num_classes); the dropout itself is
        the caller's (ref.losses.drop_labels), where the release drops inside its forward.
    gradient_checkpointing: recompute each block in the backward pass instead of storing its activations.
    """

    def __init__(self, input_size=16, patch_size=1, in_channels=32, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, class_dropout_prob=0.1, intermediate_block=None, qk_norm=False,
                 use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False, gradient_checkpointing=False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not a multiple of the patch size {patch_size}")
        if intermediate_block is not None and not 1 <= intermediate_block <= depth:
            raise ValueError(f"intermediate_block is 1-indexed in [1, {depth}] or None, got {intermediate_block}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of the head count {num_heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels  # no learned variance: unpatchify (DiT's) reads it
        self.num_classes = num_classes  # also the index of the null label
        self.class_dropout_prob = class_dropout_prob
        self.intermediate_block = intermediate_block
        self.gradient_checkpointing = gradient_checkpointing

        grid_size = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, with_null_label=class_dropout_prob > 0)
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, grid_size)[None], requires_grad=False)  # (1, T, D)
        self.feat_rope = GridRotaryEmbedding(hidden_size // num_heads, grid_size) if use_rope else None
        self.blocks = nn.ModuleList(
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        if intermediate_block is None:
            self.intermediate_head = None
        else:
            self.intermediate_head = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init (Xavier-uniform linear layers, N(0, 0.02) label table and timestep MLP, zero adaLN modulation in
        every block, zero final layer), which is the release's, except for the IG head: the IG release leaves its
        head at the Xavier init (its SiT zeroes it), and so does this."""
        dit.DiT.initialize_weights(self)
        if self.intermediate_head is not None:
            for layer in (self.intermediate_head.adaLN_modulation[-1], self.intermediate_head.linear):
                nn.init.xavier_uniform_(layer.weight)

    unpatchify = dit.DiT.unpatchify  # (N, T, p*p*C) -> (N, C, H, W), patches in raster order

    def forward(self, x, t, y):
        """x (N, C, H, W) = x_t, t (N,) in this project's convention (t = 1 noise), y (N,) labels (num_classes = null)
        -> (final, intermediate) velocities eps - x0, each (N, C, H, W); intermediate is None without the IG head."""
        c = self.t_embedder(1 - t) + self.y_embedder(y)  # (N, D); the release's time: t_release = 1 - t
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        intermediate = None
        for index, block in enumerate(self.blocks, start=1):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, self.feat_rope, use_reentrant=False)  # (N, T, D)
            else:
                tokens = block(tokens, c, self.feat_rope)  # (N, T, D)
            if index == self.intermediate_block:
                intermediate = -self.unpatchify(self.intermediate_head(tokens, c), self.out_channels)  # (N, C, H, W)
        final = -self.unpatchify(self.final_layer(tokens, c), self.out_channels)  # the release predicts x0 - eps
        return final, intermediate


# ---------------------------------------------------------------------------------------------------------------------
# Size presets (the release's LightningDiT_models, patch 1) and a tiny one for tests
# ---------------------------------------------------------------------------------------------------------------------

MODELS = {
    "LightningDiT-B/1": lambda **kwargs: LightningDiT(depth=12, hidden_size=768, num_heads=12, **kwargs),
    "LightningDiT-L/1": lambda **kwargs: LightningDiT(depth=24, hidden_size=1024, num_heads=16, **kwargs),
    "LightningDiT-XL/1": lambda **kwargs: LightningDiT(depth=28, hidden_size=1152, num_heads=16, **kwargs),
    "LightningDiT-tiny/1": lambda **kwargs: LightningDiT(depth=4, hidden_size=64, num_heads=4, **kwargs),
}
