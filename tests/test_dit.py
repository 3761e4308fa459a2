"""DiT / SiT and the IG intermediate head: shapes, init, the head's definition, checkpoint compatibility, sizes."""
import argparse
import itertools
import math

import numpy as np
import pytest
import torch

from ref.dit import (IG_HEAD_BLOCK, MODELS, Attention, DiT, TimestepEmbedder, count_parameters, ig_head_overhead,
                     load_checkpoint, sincos_pos_embed)

torch.set_num_threads(1)


def tiny(**kwargs):
    config = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=4, num_classes=5)
    return DiT(**{**config, **kwargs})


def randomise(model, seed=1):
    """Random weights everywhere (the zero init would hide most of the network)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def inputs(n=3, seed=2):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=generator)
    t = torch.rand(n, generator=generator)
    y = torch.randint(0, 6, (n,), generator=generator)  # 5 = the null label
    return x, t, y


def on_meta(name, **kwargs):
    with torch.device("meta"):
        return MODELS[name](**kwargs)


def official_shapes(depth, hidden, patch, out_channels, tokens, heads, in_channels=4, num_classes=1000):
    """Key -> shape of an official checkpoint, written out from the architecture of facebookresearch/DiT models.py
    (timm PatchEmbed, Attention and Mlp; adaLN modulation; final layer). `heads`: the output-layer prefixes."""
    d = hidden
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, in_channels, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),
    }
    for i in range(depth):
        shapes |= {
            f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
            f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d), f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        }
    for head in heads:
        patch_values = patch * patch * out_channels
        shapes |= {
            f"{head}.linear.weight": (patch_values, d), f"{head}.linear.bias": (patch_values,),
            f"{head}.adaLN_modulation.1.weight": (2 * d, d), f"{head}.adaLN_modulation.1.bias": (2 * d,),
        }
    return shapes


def meta_state(shapes):
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


XL2_256 = dict(depth=28, hidden=1152, patch=2, tokens=256)


# ---------------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("learn_sigma", [False, True])
def test_forward_gives_final_and_intermediate_images(learn_sigma):
    x, t, y = inputs()
    final, intermediate = randomise(tiny(intermediate_block=2, learn_sigma=learn_sigma))(x, t, y)
    assert final.shape == intermediate.shape == x.shape
    assert tiny()(x, t, y)[1] is None


def test_unpatchify_puts_each_patch_value_at_its_pixel():
    model = tiny(learn_sigma=True)  # 6 output channels: 3 of the prediction, 3 of the learned variance
    p, grid, out_channels = 2, 4, 6
    patches = torch.randn(2, grid * grid, p * p * out_channels)
    image = model.unpatchify(patches, out_channels)
    assert image.shape == (2, 6, 8, 8) and torch.equal(model.unpatchify(patches, 3), image[:, :3])
    for row, col, i, j, channel in itertools.product(range(grid), range(grid), range(p), range(p), range(6)):
        expected = patches[:, row * grid + col, (i * p + j) * out_channels + channel]
        assert torch.equal(image[:, channel, row * p + i, col * p + j], expected)


def test_with_variance_keeps_the_learned_variance_channels_behind_the_prediction():
    model = randomise(tiny(learn_sigma=True, intermediate_block=2))
    x, t, y = inputs()
    final, intermediate = model(x, t, y)
    full_final, full_intermediate = model(x, t, y, with_variance=True)
    assert full_final.shape == full_intermediate.shape == (3, 6, 8, 8)
    assert torch.equal(full_final[:, :3], final) and torch.equal(full_intermediate[:, :3], intermediate)
    assert full_final[:, 3:].std() > 0.1  # the variance values are the head's other outputs, not a copy
    assert not torch.allclose(full_final[:, 3:], final)


def test_attention_packs_qkv_as_torch_multihead_attention_does():
    """Same packing as timm (and so the checkpoints): rows [q; k; v] of qkv.weight, heads contiguous within each."""
    attention = randomise(Attention(hidden_size=32, num_heads=4))
    reference = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(attention.qkv.weight)
        reference.in_proj_bias.copy_(attention.qkv.bias)
        reference.out_proj.weight.copy_(attention.proj.weight)
        reference.out_proj.bias.copy_(attention.proj.bias)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(attention(x), reference(x, x, x, need_weights=False)[0], rtol=0, atol=1e-5)


def test_timestep_features_are_cos_then_sin():
    embedder = TimestepEmbedder(hidden_size=8)
    features = []
    embedder.mlp[0].register_forward_hook(lambda module, args, output: features.append(args[0]))
    t = torch.tensor([0.0, 0.37, 999.0])
    embedder(t)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(features[0], expected)


def test_positions_are_sincos_of_column_then_row():
    dim, grid = 16, 5
    positions = sincos_pos_embed(dim, grid)  # (T, D)
    omega = 10000.0 ** (-np.arange(dim // 4) / (dim // 4))
    for row, col in [(0, 0), (2, 3), (4, 1)]:
        expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
        np.testing.assert_allclose(positions[row * grid + col].numpy(), expected, atol=1e-6)


def test_zero_init_gives_zero_outputs_and_training_pulls_the_heads_apart():
    model = tiny(intermediate_block=2)
    x, t, y = inputs()
    final, intermediate = model(x, t, y)
    assert torch.equal(final, torch.zeros_like(final)) and torch.equal(intermediate, torch.zeros_like(intermediate))

    # The first Adam step moves both heads alike: the blocks are still the identity (no gradient reaches them through
    # zero output layers) and Adam ignores the 0.5; once the blocks move, the head reads different tokens.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    target = torch.randn_like(x)
    for _ in range(3):
        final, intermediate = model(x, t, y)
        loss = (final - target).square().mean() + 0.5 * (intermediate - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final, intermediate = model(x, t, y)
    assert final.abs().mean() > 1e-2 and intermediate.abs().mean() > 1e-2
    assert (final - intermediate).abs().max() > 1e-3


@pytest.mark.parametrize("k", [1, 3, 4])
def test_intermediate_head_is_the_final_layer_applied_after_block_k(k):
    """The head of a depth-4 model equals the final output of the depth-k model that shares its first k blocks and
    uses the head's weights as its final layer."""
    model = randomise(tiny(intermediate_block=k))
    truncated = tiny(depth=k)
    kept = [key for key in model.state_dict() if not key.startswith("final_layer.")
            and not (key.startswith("blocks.") and int(key.split(".")[1]) >= k)]
    truncated.load_state_dict({key.replace("intermediate_head.", "final_layer."): model.state_dict()[key]
                               for key in kept})
    x, t, y = inputs()
    torch.testing.assert_close(model(x, t, y)[1], truncated(x, t, y)[0], rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients_with_fewer_saved_activations():
    x, t, y = inputs()
    gradients, saved = [], []
    for flag in (False, True):
        model = randomise(tiny(intermediate_block=2, gradient_checkpointing=flag))
        numels = []
        with torch.autograd.graph.saved_tensors_hooks(lambda tensor: numels.append(tensor.numel()) or tensor,
                                                      lambda tensor: tensor):
            final, intermediate = model(x, t, y)
        (final.square().mean() + 0.5 * intermediate.square().mean()).backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
        saved.append(sum(numels))
    assert saved[1] < saved[0] / 2
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(gradients[1][name], gradient, rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [0, 5])
def test_head_position_outside_the_blocks_is_refused(k):
    with pytest.raises(ValueError, match="1-indexed"):
        tiny(intermediate_block=k)


# ---------------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, millions", [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458), ("DiT-XL/2", 675)])
def test_preset_sizes_match_dit_table_1(name, millions):
    assert abs(count_parameters(on_meta(name, learn_sigma=True)) / 1e6 - millions) < 0.6  # the table rounds loosely
    assert set(MODELS) == {f"{family}-{size}/{patch}" for family in ("DiT", "SiT") for size in ("S", "B", "L", "XL")
                           for patch in (2, 4, 8)}
    sit = on_meta("SiT" + name[3:], learn_sigma=True)  # SiT-X/p: the same network under SiT's name
    assert count_parameters(sit) == count_parameters(on_meta(name, learn_sigma=True)) and len(sit.blocks) == {
        "S": 12, "B": 12, "L": 24, "XL": 28}[name[4:-2]]


def test_ig_head_overhead_on_sit_xl2_matches_the_paper():
    model = on_meta("DiT-XL/2", intermediate_block=IG_HEAD_BLOCK[28])
    head, fraction = ig_head_overhead(model)
    total = count_parameters(model)
    assert head == count_parameters(model.final_layer)
    assert round((total - head) / 1e6, 1) == 675.1 and round(total / 1e6, 1) == 677.8
    assert round(100 * fraction, 1) == 0.4


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def test_official_dit_xl2_state_dict_loads_into_the_preset():
    shapes = official_shapes(**XL2_256, out_channels=8, heads=["final_layer"])
    assert len(shapes) == 292 and sum(math.prod(s) for s in shapes.values()) == 675_129_632  # as DiT's train.py prints
    model = on_meta("DiT-XL/2", learn_sigma=True)
    load_checkpoint(model, meta_state(shapes))
    assert count_parameters(model) == 675_129_632


def test_ig_release_sit_xl2_state_dict_loads_into_the_ig_preset():
    shapes = official_shapes(**XL2_256, out_channels=4, heads=["final_layer", "final_layer_xr"])
    release_checkpoint = {"model": meta_state(shapes), "ema": meta_state(shapes), "args": argparse.Namespace()}
    load_checkpoint(on_meta("DiT-XL/2", intermediate_block=8), release_checkpoint)
    with pytest.raises(ValueError, match=r"unexpected keys \(4\): final_layer_xr\.linear\.weight;"):
        load_checkpoint(on_meta("DiT-XL/2"), release_checkpoint)


@pytest.mark.parametrize("learn_sigma, tokens, message", [
    (True, 256, r"final_layer\.linear\.weight expected \(16, 1152\), got \(32, 1152\)"),
    (False, 1024, r"pos_embed expected \(1, 256, 1152\), got \(1, 1024, 1152\)"),
])
def test_shape_mismatch_names_key_and_both_shapes(learn_sigma, tokens, message):
    shapes = official_shapes(**{**XL2_256, "tokens": tokens}, out_channels=8 if learn_sigma else 4,
                             heads=["final_layer"])
    with pytest.raises(ValueError, match=message):
        load_checkpoint(on_meta("DiT-XL/2"), meta_state(shapes))


def test_a_refused_checkpoint_changes_nothing():
    model = tiny()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"shape mismatches \(2\)"):
        load_checkpoint(model, randomise(tiny(learn_sigma=True)).state_dict())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_plain_checkpoint_into_an_ig_model_needs_allow_missing_head():
    plain, model = randomise(tiny()), tiny(intermediate_block=2)
    with pytest.raises(ValueError, match=r"missing keys \(4\): intermediate_head\.linear\.weight;"):
        load_checkpoint(model, plain.state_dict())
    load_checkpoint(model, plain.state_dict(), allow_missing_head=True)
    x, t, y = inputs()
    final, intermediate = model(x, t, y)
    assert torch.equal(final, plain(x, t, y)[0])
    assert torch.equal(intermediate, torch.zeros_like(intermediate))  # the head keeps its zero init


def test_release_names_and_training_wrappers_load_with_their_values(tmp_path):
    source = randomise(tiny(intermediate_block=2))
    release_state = {"module." + key.replace("intermediate_head.", "final_layer_xr."): value
                     for key, value in source.state_dict().items()}
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": tiny(intermediate_block=2).state_dict(), "ema": release_state,
                "args": argparse.Namespace(model="DiT-S/2"), "steps": 7}, path)
    x, t, y = inputs()
    ema_outputs = load_checkpoint(tiny(intermediate_block=2), path)(x, t, y)
    for got, expected in zip(ema_outputs, source(x, t, y)):
        assert torch.equal(got, expected)
    final, _ = load_checkpoint(tiny(intermediate_block=2), path, prefer="model")(x, t, y)
    assert torch.equal(final, torch.zeros_like(final))
