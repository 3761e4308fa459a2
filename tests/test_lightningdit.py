"""LightningDiT + IG head: the release's key layout and size, RoPE, RMSNorm, SwiGLU, wo_shift, qk-norm, the head's
definition, the time adapter, loading a release-style checkpoint, and a few training steps."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ref.dit import canonical_key, count_parameters, load_checkpoint
from ref.lightningdit import (MODELS, Attention, GridRotaryEmbedding, LightningDiT, LightningDiTBlock, RMSNorm, SwiGLU,
                              apply_rope, rope_angles, swiglu_hidden_size)
from ref.losses import flow_matching_loss

torch.set_num_threads(1)


def tiny(**kwargs):
    config = dict(input_size=4, in_channels=3, hidden_size=32, depth=3, num_heads=2, num_classes=5)
    return LightningDiT(**{**config, **kwargs})


def randomise(module, seed=1):
    """Random weights everywhere (the zero init would hide most of the network); buffers (RoPE tables) kept."""
    count = parameters_to_vector(module.parameters()).numel()
    vector_to_parameters(0.3 * torch.randn(count, generator=torch.Generator().manual_seed(seed)), module.parameters())
    return module


def inputs(n=3, channels=3, size=4, seed=2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=generator)
    t = torch.rand(n, generator=generator)
    y = torch.randint(0, 6, (n,), generator=generator)  # 5 = the null label
    return x, t, y


# ---------------------------------------------------------------------------------------------------------------------
# The release's checkpoint layout
# ---------------------------------------------------------------------------------------------------------------------

def release_xl1_layout():
    """Keys and shapes of the IG release's LightningDiT-XL/1 (CVL-UESTC/Internal-Guidance, LightningDiT/models/
    lightningdit.py, with lightningdit_xl_vavae_f16d32.yaml: 32 latent channels, 16 x 16 tokens, patch 1, SwiGLU, RoPE,
    RMSNorm, no qk-norm, adaLN with shift, head `final_layer_xr`), written from its module definitions."""
    width, channels, tokens, head_dim, ffn, labels = 1152, 32, 256, 72, 3072, 1001
    layout = {
        "pos_embed": (1, tokens, width),
        "x_embedder.proj.weight": (width, channels, 1, 1), "x_embedder.proj.bias": (width,),  # timm PatchEmbed
        "t_embedder.mlp.0.weight": (width, 256), "t_embedder.mlp.0.bias": (width,),
        "t_embedder.mlp.2.weight": (width, width), "t_embedder.mlp.2.bias": (width,),
        "y_embedder.embedding_table.weight": (labels, width),
        "feat_rope.freqs_cos": (tokens, head_dim), "feat_rope.freqs_sin": (tokens, head_dim),  # registered buffers
    }
    for block in range(28):
        prefix = f"blocks.{block}."
        layout.update({
            prefix + "norm1.weight": (width,), prefix + "norm2.weight": (width,),
            prefix + "attn.qkv.weight": (3 * width, width), prefix + "attn.qkv.bias": (3 * width,),
            prefix + "attn.proj.weight": (width, width), prefix + "attn.proj.bias": (width,),
            prefix + "mlp.w12.weight": (2 * ffn, width), prefix + "mlp.w12.bias": (2 * ffn,),
            prefix + "mlp.w3.weight": (width, ffn), prefix + "mlp.w3.bias": (width,),
            prefix + "adaLN_modulation.1.weight": (6 * width, width), prefix + "adaLN_modulation.1.bias": (6 * width,),
        })
    for head in ("final_layer", "final_layer_xr"):
        layout.update({
            head + ".norm_final.weight": (width,),
            head + ".linear.weight": (channels, width), head + ".linear.bias": (channels,),
            head + ".adaLN_modulation.1.weight": (2 * width, width), head + ".adaLN_modulation.1.bias": (2 * width,),
        })
    return layout


def test_xl1_keys_and_shapes_equal_the_release_checkpoint_layout():
    with torch.device("meta"):
        model = MODELS["LightningDiT-XL/1"](intermediate_block=8)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    release = {canonical_key(key): shape for key, shape in release_xl1_layout().items()}
    assert ours == release


def test_xl1_parameter_count():
    """677,951,296: /work/shared/notes/internal-guidance.md ("Parameters (public code, built here)": the release's
    LightningDiT-XL/1 with the IG head and 32 latent channels, built from its public code); it also equals the sum
    over the layout above without the two RoPE buffers, and the head adds 0.40% (the paper: about 0.4%)."""
    with torch.device("meta"):
        model = MODELS["LightningDiT-XL/1"](intermediate_block=8)
    layout = release_xl1_layout()
    from_layout = sum(math.prod(shape) for key, shape in layout.items() if not key.startswith("feat_rope."))
    assert count_parameters(model) == from_layout == 677_951_296
    head = count_parameters(model.intermediate_head)
    assert head / (count_parameters(model) - head) == pytest.approx(0.0040, abs=5e-5)


def test_presets_follow_the_release():
    expected = {"LightningDiT-B/1": (12, 768, 12, 2048), "LightningDiT-L/1": (24, 1024, 16, 2730),
                "LightningDiT-XL/1": (28, 1152, 16, 3072)}
    for name, (depth, width, heads, ffn) in expected.items():
        with torch.device("meta"):
            model = MODELS[name]()
        block = model.blocks[0]
        assert (len(model.blocks), model.pos_embed.shape[-1], block.attn.num_heads) == (depth, width, heads)
        assert block.mlp.w3.in_features == ffn == swiglu_hidden_size(width, 4.0)
        assert model.x_embedder.proj.kernel_size == (1, 1) and model.in_channels == 32 and model.input_size == 16
        assert model.intermediate_head is None and isinstance(model.blocks[0].norm1, RMSNorm)


# ---------------------------------------------------------------------------------------------------------------------
# Parts against independent computations
# ---------------------------------------------------------------------------------------------------------------------

def rotated(vector, row, col):
    """vector (head_dim,) at grid position (row, col) through the RoPE of this module."""
    angles = rope_angles(torch.tensor([row]), torch.tensor([col]), vector.shape[-1])  # (1, head_dim)
    return apply_rope(vector[None], angles.cos(), angles.sin())[0]


def test_rope_relative_position_property():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=generator, dtype=torch.float64).float()
    base = rotated(q, 2, 5) @ rotated(k, 7, 1)
    for shift in [(3, 0), (0, -4), (5, 9)]:  # a common shift of both positions
        shifted = rotated(q, 2 + shift[0], 5 + shift[1]) @ rotated(k, 7 + shift[0], 1 + shift[1])
        assert shifted.item() == pytest.approx(base.item(), abs=1e-4)
    for q_shift in [(1, 0), (0, 1)]:  # moving q alone along either axis changes the product
        moved = rotated(q, 2 + q_shift[0], 5 + q_shift[1]) @ rotated(k, 7, 1)
        assert abs(moved.item() - base.item()) > 1e-2
    assert (rotated(q, 3, 4).norm() - q.norm()).abs() < 1e-5  # a rotation


def test_rope_table_layout_equals_complex_rotation_by_row_then_column():
    """VisionRotaryEmbeddingFast's layout re-derived: channel pairs read as complex numbers; the first half turns by
    row * f_j, the second by col * f_j, f_j = 10000^(-2j / (head_dim/2)); tokens in raster order."""
    head_dim, grid = 16, 3
    rope = GridRotaryEmbedding(head_dim, grid)
    x = torch.randn(1, 1, grid * grid, head_dim, generator=torch.Generator().manual_seed(3))
    frequencies = 10000.0 ** (-torch.arange(0, head_dim // 2, 2, dtype=torch.float64) / (head_dim // 2))  # (4,)
    expected = torch.empty(grid * grid, head_dim, dtype=torch.float64)
    for row in range(grid):
        for col in range(grid):
            token = x[0, 0, row * grid + col].double()
            pairs = torch.view_as_complex(token.reshape(-1, 2).contiguous())  # (8,)
            turns = torch.polar(torch.ones(8, dtype=torch.float64), torch.cat([row * frequencies, col * frequencies]))
            expected[row * grid + col] = torch.view_as_real(pairs * turns).flatten()
    assert torch.allclose(rope(x)[0, 0].double(), expected, atol=1e-5)
    assert rope.freqs_cos.shape == (grid * grid, head_dim)
    with pytest.raises(ValueError, match="multiple of 4"):
        GridRotaryEmbedding(6, grid)


def test_rmsnorm_against_independent_computation():
    norm = randomise(RMSNorm(8))
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    expected = x.double() / (x.double().square().mean(-1, keepdim=True) + 1e-6).sqrt() * norm.weight.double()
    assert torch.allclose(norm(x).double(), expected, atol=1e-5)
    half = norm(x.bfloat16().to(torch.float32))  # the statistics are float32 whatever the input dtype
    assert torch.allclose(norm(x.bfloat16()).float(), half, atol=3e-2)


def test_swiglu_against_independent_computation():
    ffn = randomise(SwiGLU(8, 12))
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5))
    w12, b12, w3, b3 = ffn.w12.weight, ffn.w12.bias, ffn.w3.weight, ffn.w3.bias
    gate = x @ w12[:12].T + b12[:12]
    value = x @ w12[12:].T + b12[12:]
    expected = (gate * torch.sigmoid(gate) * value) @ w3.T + b3
    assert torch.allclose(ffn(x), expected, atol=1e-5)
    assert swiglu_hidden_size(1152, 4.0) == 3072 and swiglu_hidden_size(1024, 4.0) == 2730


def test_wo_shift_regresses_scale_and_gate_only():
    """A wo_shift block equals a shifted block whose shift rows are zero and whose scale/gate rows are its own."""
    torch.manual_seed(6)
    plain = randomise(LightningDiTBlock(16, 2, wo_shift=True), seed=6)
    shifted = randomise(LightningDiTBlock(16, 2, wo_shift=False), seed=7)
    assert plain.adaLN_modulation[1].out_features == 4 * 16
    state = shifted.state_dict()
    state.update({key: value for key, value in plain.state_dict().items() if "adaLN" not in key})
    for name in ("weight", "bias"):
        scale_attn, gate_attn, scale_mlp, gate_mlp = plain.state_dict()[f"adaLN_modulation.1.{name}"].chunk(4)
        zero = torch.zeros_like(scale_attn)
        state[f"adaLN_modulation.1.{name}"] = torch.cat([zero, scale_attn, gate_attn, zero, scale_mlp, gate_mlp])
    shifted.load_state_dict(state)
    x, c = torch.randn(2, 9, 16), torch.randn(2, 16)
    assert torch.allclose(plain(x, c), shifted(x, c), atol=1e-5)
    with torch.no_grad():
        shifted.adaLN_modulation[1].bias[:16] += 1.0  # a non-zero shift changes the output: it was really used
    assert not torch.allclose(plain(x, c), shifted(x, c), atol=1e-3)


def test_attention_with_qk_norm_and_rope_against_independent_computation():
    """qk-norm (RMSNorm per head, with its weight), then q and k turned as complex pairs, then softmax attention."""
    heads, head_dim, grid = 2, 8, 2
    attention = randomise(Attention(heads * head_dim, heads, qk_norm=True), seed=12)
    rope = GridRotaryEmbedding(head_dim, grid)
    x = torch.randn(1, grid * grid, heads * head_dim, generator=torch.Generator().manual_seed(13))
    q, k, v = (x @ attention.qkv.weight.T + attention.qkv.bias).reshape(grid * grid, 3, heads, head_dim).unbind(1)

    def normalised(vectors, weight):  # (T, H, d)
        return vectors / (vectors.square().mean(-1, keepdim=True) + 1e-6).sqrt() * weight

    turns = torch.polar(torch.ones(grid * grid, head_dim // 2), torch.stack([  # (T, d/2), from rope_angles' layout
        torch.cat([row * 10000.0 ** (-torch.arange(0.0, 4, 2) / 4), col * 10000.0 ** (-torch.arange(0.0, 4, 2) / 4)])
        for row in range(grid) for col in range(grid)]))

    def turned(vectors):  # (T, H, d)
        pairs = torch.view_as_complex(vectors.reshape(grid * grid, heads, -1, 2).contiguous())  # (T, H, d/2)
        return torch.view_as_real(pairs * turns[:, None]).flatten(-2)

    q, k = turned(normalised(q, attention.q_norm.weight)), turned(normalised(k, attention.k_norm.weight))
    weights = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim), dim=-1)  # (H, T, T)
    mixed = torch.einsum("hqk,khd->qhd", weights, v).reshape(grid * grid, heads * head_dim)
    expected = mixed @ attention.proj.weight.T + attention.proj.bias
    assert torch.allclose(attention(x, rope)[0], expected, atol=1e-5)


@pytest.mark.parametrize("use_rmsnorm", [True, False])
def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k(use_rmsnorm):
    torch.manual_seed(8)
    x = torch.randn(2, 6, 16)
    for qk_norm in (True, False):
        attention = randomise(Attention(16, 2, qk_norm=qk_norm, use_rmsnorm=use_rmsnorm), seed=9)
        reference = attention(x)
        with torch.no_grad():  # q and k rows of the projection times 3
            attention.qkv.weight[:32] *= 3
            attention.qkv.bias[:32] *= 3
        same = torch.allclose(attention(x), reference, atol=1e-4)
        assert same == qk_norm
        keys = set(attention.state_dict())
        assert ("q_norm.weight" in keys and "k_norm.weight" in keys) == qk_norm
        assert ("q_norm.bias" in keys) == (qk_norm and not use_rmsnorm)  # LayerNorm with affine when RMSNorm is off


# ---------------------------------------------------------------------------------------------------------------------
# The model: head definition, time adapter, checkpoints, training
# ---------------------------------------------------------------------------------------------------------------------

def test_without_the_head_the_model_equals_the_same_weights():
    with_head = randomise(tiny(intermediate_block=2))
    without = tiny(intermediate_block=None)
    state = {key: value for key, value in with_head.state_dict().items() if not key.startswith("intermediate_head.")}
    without.load_state_dict(state)  # strict: the remaining keys are exactly the plain model's
    x, t, y = inputs()
    final, intermediate = with_head(x, t, y)
    plain_final, plain_intermediate = without(x, t, y)
    assert torch.equal(final, plain_final) and plain_intermediate is None
    assert intermediate.shape == final.shape and not torch.allclose(intermediate, final, atol=1e-3)


def test_the_head_reads_block_k_only():
    model = randomise(tiny(intermediate_block=2))
    x, t, y = inputs()
    final, intermediate = model(x, t, y)
    with torch.no_grad():
        model.blocks[2].attn.proj.weight.add_(1.0)  # block 3, after the head
    later_final, later_intermediate = model(x, t, y)
    assert torch.equal(later_intermediate, intermediate) and not torch.allclose(later_final, final, atol=1e-3)
    with torch.no_grad():
        model.blocks[1].attn.proj.weight.add_(1.0)  # block 2, before the head
    assert not torch.allclose(model(x, t, y)[1], intermediate, atol=1e-3)


def test_forward_is_the_release_network_at_its_own_time_with_negated_output():
    """Re-assembled from the parts in the release's order (its forward at t_release = 1 - t), then negated."""
    model = randomise(tiny(intermediate_block=1))
    x, t, y = inputs()
    c = model.t_embedder(1 - t) + model.y_embedder(y)
    tokens = model.x_embedder(x) + model.pos_embed
    tokens = model.blocks[0](tokens, c, model.feat_rope)
    head = model.intermediate_head(tokens, c)
    for block in model.blocks[1:]:
        tokens = block(tokens, c, model.feat_rope)
    velocity = model.final_layer(tokens, c)

    def image(patches):  # (N, T, C) -> (N, C, H, W), patch 1
        return patches.transpose(1, 2).reshape(x.shape)

    final, intermediate = model(x, t, y)
    assert torch.allclose(final, -image(velocity), atol=1e-6)
    assert torch.allclose(intermediate, -image(head), atol=1e-6)


def test_release_style_checkpoint_loads_as_it_is():
    source = randomise(tiny(intermediate_block=2))
    release_keys = {key.replace("intermediate_head.", "final_layer_xr."): value
                    for key, value in source.state_dict().items()}
    target = load_checkpoint(tiny(intermediate_block=2), {"ema": release_keys, "model": {}})
    x, t, y = inputs()
    assert all(torch.equal(a, b) for a, b in zip(source(x, t, y), target(x, t, y)))
    with pytest.raises(ValueError, match="unexpected keys"):  # a head in the file and none in the model
        load_checkpoint(tiny(), release_keys)


def test_configuration_errors():
    with pytest.raises(ValueError, match="intermediate_block"):
        tiny(intermediate_block=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny(hidden_size=36, num_heads=2)  # head size 18
    with pytest.raises(ValueError, match="patch size"):
        tiny(patch_size=3)


def test_initialisation_starts_from_zero_output_except_the_head():
    model = tiny(intermediate_block=1)
    final, intermediate = model(*inputs())
    assert torch.equal(final, torch.zeros_like(final))
    assert intermediate.abs().sum() > 0  # the release leaves its head at the Xavier init


def test_tiny_model_fits_one_batch_with_flow_matching_loss():
    torch.manual_seed(10)
    model = MODELS["LightningDiT-tiny/1"](input_size=4, in_channels=4, num_classes=3, intermediate_block=2,
                                          qk_norm=True)
    generator = torch.Generator().manual_seed(11)
    x0 = torch.randn(8, 4, 4, 4, generator=generator)
    eps = torch.randn(8, 4, 4, 4, generator=generator)
    t = torch.rand(8, generator=generator)
    y = torch.randint(0, 3, (8,), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(28):
        loss = flow_matching_loss(model, x0, t, y, eps).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert model.intermediate_head.linear.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    gradients = []
    for recompute in (False, True):
        model = randomise(tiny(intermediate_block=2, gradient_checkpointing=recompute))
        x, t, y = inputs()
        flow_matching_loss(model, x, t, y, torch.ones_like(x)).mean().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(*gradients, atol=1e-5)


def test_layernorm_and_gelu_variant_builds_and_runs():
    """The release's switches off: LayerNorm without affine, GELU MLP (timm's fc1/fc2), no RoPE."""
    model = randomise(tiny(use_rmsnorm=False, use_swiglu=False, use_rope=False, intermediate_block=1))
    keys = set(model.state_dict())
    assert "blocks.0.mlp.fc1.weight" in keys and "blocks.0.norm1.weight" not in keys and model.feat_rope is None
    final, intermediate = model(*inputs())
    assert torch.isfinite(final).all() and torch.isfinite(intermediate).all()
    assert F.mse_loss(final, intermediate) > 0
