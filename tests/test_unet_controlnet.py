"""SD-style UNet and ControlNet: the SD1.5 / ControlNet 1.0 key layout and sizes, the zero-conv identity at
initialisation, where the residuals go, the feature taps, bad controls and checkpoint loading."""
import math

import numpy as np
import pytest
import torch

from ref.controlnet import MODELS as CONTROLNETS
from ref.controlnet import ControlNet, hint_encoder
from ref.guidance import controlled_denoiser
from ref.unet import MODELS, load_checkpoint, timestep_embedding

torch.set_num_threads(1)


def randomise(model, seed=1):
    """Random weights everywhere: the LDM zero inits (ResBlock out convs, proj_out, the output conv) would make the
    UNet the zero function and hide everything these tests look at."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def tiny_unet():
    return randomise(MODELS["tiny"]())


def inputs(n=2, height=32, width=32, seed=2):
    """x (N, 3, H, W), t (N,) integer steps, context (N, 5, 32), hint (N, 3, H, W): the tiny preset's shapes."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, height, width, generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator)
    context = torch.randn(n, 5, 32, generator=generator)
    hint = torch.rand(n, 3, height, width, generator=generator)
    return x, t, context, hint


def sd15_inputs(n=1):
    """Meta tensors for SD1.5: a 64x64 latent, 77 CLIP tokens, a 512x512 control."""
    with torch.device("meta"):
        return torch.empty(n, 4, 64, 64), torch.empty(n), torch.empty(n, 77, 768), torch.empty(n, 3, 512, 512)


def on_meta(models, name):
    with torch.device("meta"):
        return models[name]()


# ---------------------------------------------------------------------------------------------------------------------
# The SD1.5 UNet and ControlNet 1.0 layouts, written out from the public architecture
# ---------------------------------------------------------------------------------------------------------------------
# Sources: CompVis/stable-diffusion ldm/modules/diffusionmodules/openaimodel.py (UNetModel, ResBlock, Downsample,
# Upsample) and ldm/modules/attention.py (SpatialTransformer, BasicTransformerBlock, CrossAttention without q/k/v bias,
# GEGLU FeedForward); configs/stable-diffusion/v1-inference.yaml and lllyasviel/ControlNet models/cldm_v15.yaml
# (model_channels 320, channel_mult [1, 2, 4, 4], 2 res blocks, attention_resolutions [4, 2, 1], 8 heads, context 768,
# conv proj_in / proj_out); lllyasviel/ControlNet cldm/cldm.py (input_hint_block, zero_convs, middle_block_out).
# Sizes: the SD1.5 UNet has 859,520,964 parameters (diffusers docs, ModelMixin.num_parameters on
# stable-diffusion-v1-5's unet; "DiffusionWrapper has 859.52 M params" in the LDM load log) in 686 tensors (the same
# count is pinned by public SD1.5 weight-schema tests). The ControlNet is listed as "361 M" in the Lightning summary of
# lllyasviel/ControlNet issue #321 and as 361.28M elsewhere; the exact count, from this layout, is 361,279,120.

def conv_shapes(prefix, cin, cout, kernel):
    return {f"{prefix}.weight": (cout, cin, kernel, kernel), f"{prefix}.bias": (cout,)}


def norm_shapes(prefix, channels):
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,)}


def linear_shapes(prefix, cin, cout, bias=True):
    return {f"{prefix}.weight": (cout, cin)} | ({f"{prefix}.bias": (cout,)} if bias else {})


def res_shapes(prefix, cin, cout, emb=1280):
    shapes = (norm_shapes(f"{prefix}.in_layers.0", cin) | conv_shapes(f"{prefix}.in_layers.2", cin, cout, 3)
              | linear_shapes(f"{prefix}.emb_layers.1", emb, cout)
              | norm_shapes(f"{prefix}.out_layers.0", cout) | conv_shapes(f"{prefix}.out_layers.3", cout, cout, 3))
    return shapes | (conv_shapes(f"{prefix}.skip_connection", cin, cout, 1) if cin != cout else {})


def attention_shapes(prefix, dim, context_dim):
    return (linear_shapes(f"{prefix}.to_q", dim, dim, bias=False)
            | linear_shapes(f"{prefix}.to_k", context_dim, dim, bias=False)
            | linear_shapes(f"{prefix}.to_v", context_dim, dim, bias=False)
            | linear_shapes(f"{prefix}.to_out.0", dim, dim))


def transformer_shapes(prefix, c, context_dim=768):
    block = f"{prefix}.transformer_blocks.0"
    return (norm_shapes(f"{prefix}.norm", c) | conv_shapes(f"{prefix}.proj_in", c, c, 1)
            | attention_shapes(f"{block}.attn1", c, c) | attention_shapes(f"{block}.attn2", c, context_dim)
            | linear_shapes(f"{block}.ff.net.0.proj", c, 8 * c) | linear_shapes(f"{block}.ff.net.2", 4 * c, c)
            | norm_shapes(f"{block}.norm1", c) | norm_shapes(f"{block}.norm2", c) | norm_shapes(f"{block}.norm3", c)
            | conv_shapes(f"{prefix}.proj_out", c, c, 1))


# layer -> (kind, channels...): "res" (in, out), "attn" (channels), "down" / "up" (channels), "conv" (in, out)
SD15_ENCODER = {
    "input_blocks.0.0": ("conv", 4, 320),
    "input_blocks.1.0": ("res", 320, 320), "input_blocks.1.1": ("attn", 320),
    "input_blocks.2.0": ("res", 320, 320), "input_blocks.2.1": ("attn", 320),
    "input_blocks.3.0": ("down", 320),
    "input_blocks.4.0": ("res", 320, 640), "input_blocks.4.1": ("attn", 640),
    "input_blocks.5.0": ("res", 640, 640), "input_blocks.5.1": ("attn", 640),
    "input_blocks.6.0": ("down", 640),
    "input_blocks.7.0": ("res", 640, 1280), "input_blocks.7.1": ("attn", 1280),
    "input_blocks.8.0": ("res", 1280, 1280), "input_blocks.8.1": ("attn", 1280),
    "input_blocks.9.0": ("down", 1280),
    "input_blocks.10.0": ("res", 1280, 1280),
    "input_blocks.11.0": ("res", 1280, 1280),
    "middle_block.0": ("res", 1280, 1280), "middle_block.1": ("attn", 1280), "middle_block.2": ("res", 1280, 1280),
}
SD15_DECODER = {  # each ResBlock reads concat(h, skip)
    "output_blocks.0.0": ("res", 2560, 1280),
    "output_blocks.1.0": ("res", 2560, 1280),
    "output_blocks.2.0": ("res", 2560, 1280), "output_blocks.2.1": ("up", 1280),
    "output_blocks.3.0": ("res", 2560, 1280), "output_blocks.3.1": ("attn", 1280),
    "output_blocks.4.0": ("res", 2560, 1280), "output_blocks.4.1": ("attn", 1280),
    "output_blocks.5.0": ("res", 1920, 1280), "output_blocks.5.1": ("attn", 1280), "output_blocks.5.2": ("up", 1280),
    "output_blocks.6.0": ("res", 1920, 640), "output_blocks.6.1": ("attn", 640),
    "output_blocks.7.0": ("res", 1280, 640), "output_blocks.7.1": ("attn", 640),
    "output_blocks.8.0": ("res", 960, 640), "output_blocks.8.1": ("attn", 640), "output_blocks.8.2": ("up", 640),
    "output_blocks.9.0": ("res", 960, 320), "output_blocks.9.1": ("attn", 320),
    "output_blocks.10.0": ("res", 640, 320), "output_blocks.10.1": ("attn", 320),
    "output_blocks.11.0": ("res", 640, 320), "output_blocks.11.1": ("attn", 320),
}


def layer_shapes(layers):
    shapes = {}
    for prefix, (kind, *channels) in layers.items():
        if kind == "res":
            shapes |= res_shapes(prefix, *channels)
        elif kind == "attn":
            shapes |= transformer_shapes(prefix, *channels)
        elif kind == "conv":
            shapes |= conv_shapes(prefix, *channels, 3)
        else:  # Downsample .op / Upsample .conv: 3x3, channels kept
            shapes |= conv_shapes(f"{prefix}.{'op' if kind == 'down' else 'conv'}", channels[0], channels[0], 3)
    return shapes


TIME_EMBED = linear_shapes("time_embed.0", 320, 1280) | linear_shapes("time_embed.2", 1280, 1280)


def sd15_unet_shapes():
    out = norm_shapes("out.0", 320) | conv_shapes("out.2", 320, 4, 3)
    return TIME_EMBED | layer_shapes(SD15_ENCODER) | layer_shapes(SD15_DECODER) | out


def sd15_controlnet_shapes():
    hint_channels = (3, 16, 16, 32, 32, 96, 96, 256, 320)  # 3x3 convs at the even indices 0 .. 14
    hint = {}
    for index, (cin, cout) in enumerate(zip(hint_channels[:-1], hint_channels[1:])):
        hint |= conv_shapes(f"input_hint_block.{2 * index}", cin, cout, 3)
    skip_channels = (320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280)  # after input blocks 0 .. 11
    zero_convs = {}
    for index, channels in enumerate(skip_channels):
        zero_convs |= conv_shapes(f"zero_convs.{index}.0", channels, channels, 1)
    middle = conv_shapes("middle_block_out.0", 1280, 1280, 1)
    return TIME_EMBED | layer_shapes(SD15_ENCODER) | hint | zero_convs | middle


def shapes_of(model):
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_sd15_unet_has_the_original_keys_shapes_and_size():
    expected = sd15_unet_shapes()
    assert len(expected) == 686 and sum(math.prod(shape) for shape in expected.values()) == 859_520_964
    model = on_meta(MODELS, "sd15")
    assert shapes_of(model) == expected
    assert sum(p.numel() for p in model.parameters()) == 859_520_964


def test_sd15_controlnet_has_the_controlnet_keys_shapes_and_size():
    expected = sd15_controlnet_shapes()
    assert len(expected) == 340 and sum(math.prod(shape) for shape in expected.values()) == 361_279_120
    model = on_meta(CONTROLNETS, "sd15")
    assert shapes_of(model) == expected
    assert sum(p.numel() for p in model.parameters()) == 361_279_120


# ---------------------------------------------------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------------------------------------------------

def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 3.0, 999.0])
    frequencies = torch.tensor([1.0, 0.01])  # 10000^(-i/2), i = 0, 1
    angles = t[:, None] * frequencies
    expected = torch.cat([angles.cos(), angles.sin()], dim=1)
    torch.testing.assert_close(timestep_embedding(t, 4), expected)


def test_embed_time_is_the_mlp_of_the_sinusoids():
    unet = tiny_unet()
    t = torch.tensor([5, 500])
    emb = unet.embed_time(t)
    assert emb.shape == (2, 128)
    torch.testing.assert_close(emb, unet.time_embed(timestep_embedding(t, 32)))


# ---------------------------------------------------------------------------------------------------------------------
# ControlNet: zero-conv identity, where the residuals go, shapes
# ---------------------------------------------------------------------------------------------------------------------

def test_controlnet_copies_the_encoder_and_zero_inits_its_own_layers():
    unet = tiny_unet()
    controlnet = ControlNet.from_unet(unet, hint_downsampling=1)
    unet_state, control_state = unet.state_dict(), controlnet.state_dict()
    own = ("input_hint_block.14.", "zero_convs.", "middle_block_out.")
    for key, value in control_state.items():
        if key.startswith(own):
            assert not value.any(), key
        elif not key.startswith("input_hint_block."):
            assert torch.equal(value, unet_state[key]), key


def test_controlled_unet_equals_the_plain_unet_at_init_and_not_after_training_a_zero_conv():
    unet = tiny_unet()
    controlnet = ControlNet.from_unet(unet, hint_downsampling=1)
    x, t, context, hint = inputs()
    plain = unet(x, t, context)
    assert torch.equal(unet(x, t, context, control=controlnet(x, hint, t, context)), plain)
    with torch.no_grad():
        controlnet.zero_convs[2][0].weight.normal_()
    assert not torch.allclose(unet(x, t, context, control=controlnet(x, hint, t, context)), plain, atol=1e-4)


def test_controlled_denoiser_without_a_controlnet_is_the_plain_unet_with_text_cfg():
    """controlnet None: the UNet alone (any hint ignored); CFG is uncond + s (cond - uncond) on the empty context."""
    unet = tiny_unet()
    x, t, context, hint = inputs()
    null = torch.zeros(1, *context.shape[1:])
    cond, uncond = unet(x, t, context), unet(x, t, null.expand_as(context))
    assert torch.equal(controlled_denoiser(unet, None, context, null, hint, 1.0)(x, t), cond)
    assert torch.allclose(controlled_denoiser(unet, None, context, null, torch.rand_like(hint), 3.0)(x, t),
                          uncond + 3.0 * (cond - uncond), atol=1e-5)


def test_residuals_are_added_to_the_middle_output_and_to_the_skip_half_of_each_decoder_input():
    unet = tiny_unet()
    x, t, context, _ = inputs()
    generator = torch.Generator().manual_seed(3)
    control = [torch.randn(2, *shape, generator=generator) for shape in unet.residual_shapes(32, 32)]
    controlled = unet(x, t, context, control=control)

    # the same additions made by hooks on a plain pass: decoder block k reads skip n-1-k
    def add_to_skip(residual):
        def hook(module, args):
            h_and_skip, *rest = args
            skip_channels = residual.shape[1]
            offset = torch.cat([torch.zeros_like(h_and_skip[:, :-skip_channels]), residual], dim=1)
            return (h_and_skip + offset, *rest)
        return hook

    handles = [unet.middle_block.register_forward_hook(lambda module, args, output: output + control[-1])]
    handles += [block.register_forward_pre_hook(add_to_skip(residual))
                for block, residual in zip(unet.output_blocks, reversed(control[:-1]))]
    hooked = unet(x, t, context)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(controlled, hooked, rtol=0, atol=1e-6)
    assert not torch.allclose(controlled, unet(x, t, context), atol=1e-3)


def test_control_scales_multiply_the_residuals():
    unet = tiny_unet()
    controlnet = randomise(ControlNet.from_unet(unet, hint_downsampling=1), seed=4)
    x, t, context, hint = inputs()
    full = controlnet(x, hint, t, context)
    scales = [0.5 * k for k in range(len(full))]
    for residual, scaled, scale in zip(full, controlnet(x, hint, t, context, scales=scales), scales):
        torch.testing.assert_close(scaled, scale * residual)
    for residual, halved in zip(full, controlnet(x, hint, t, context, scales=0.5)):
        torch.testing.assert_close(halved, 0.5 * residual)
    for number in (np.float32(0.5), np.array(0.5), torch.tensor(0.5, dtype=torch.float64)):  # one number, any type
        assert all(torch.equal(a, b) for a, b in zip(controlnet(x, hint, t, context, scales=number),
                                                     controlnet(x, hint, t, context, scales=0.5)))
    for each in (torch.tensor(scales), np.array(scales, dtype=np.float32)):  # one a residual
        assert all(torch.equal(a, b) for a, b in zip(controlnet(x, hint, t, context, scales=each),
                                                     controlnet(x, hint, t, context, scales=scales)))
    with pytest.raises(ValueError, match="one number or 5"):
        controlnet(x, hint, t, context, scales=[1.0, 1.0])


def test_tiny_hint_encoder_and_residual_shapes():
    controlnet = CONTROLNETS["tiny"]()
    x, t, context, hint = inputs()
    assert controlnet.input_hint_block(hint).shape == (2, 32, 32, 32)  # pixel space: hint downsampling 1
    # conv 32 @32 | Res 32 @32 | down 32 @16 | Res+A 64 @16 | middle 64 @16
    expected = [(32, 32, 32), (32, 32, 32), (32, 16, 16), (64, 16, 16), (64, 16, 16)]
    assert [tuple(r.shape[1:]) for r in controlnet(x, hint, t, context)] == expected


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_hint_encoder_downsamples_by_its_factor_with_the_same_parameters(factor):
    encoder = hint_encoder(3, 32, factor)
    assert encoder(torch.zeros(1, 3, 16 * factor, 8 * factor)).shape == (1, 32, 16, 8)
    assert sum(p.numel() for p in encoder.parameters()) == sum(p.numel() for p in hint_encoder(3, 32, 8).parameters())


def test_sd15_hint_encoder_and_residual_shapes():
    controlnet = on_meta(CONTROLNETS, "sd15")
    x, t, context, hint = sd15_inputs()
    assert controlnet.input_hint_block(hint).shape == (1, 320, 64, 64)
    expected = ([(320, 64, 64)] * 3 + [(320, 32, 32)] + [(640, 32, 32)] * 2 + [(640, 16, 16)] + [(1280, 16, 16)] * 2
                + [(1280, 8, 8)] * 4)  # 12 skips, then the middle block
    residuals = controlnet(x, hint, t, context)
    assert [tuple(r.shape[1:]) for r in residuals] == expected
    unet = on_meta(MODELS, "sd15")
    assert unet(x, t, context, control=residuals).shape == (1, 4, 64, 64)


# ---------------------------------------------------------------------------------------------------------------------
# Bad controls
# ---------------------------------------------------------------------------------------------------------------------

def test_a_control_of_the_wrong_size_or_channels_is_refused_naming_the_expected_shape():
    unet = tiny_unet()
    controlnet = ControlNet.from_unet(unet, hint_downsampling=1)
    x, t, context, hint = inputs()
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\).*got \(2, 1, 32, 32\)"):
        controlnet(x, hint[:, :1], t, context)
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\).*got \(2, 3, 64, 64\)"):
        controlnet(x, torch.zeros(2, 3, 64, 64), t, context)
    with pytest.raises(ValueError, match=r"\(2, 3, 256, 256\).*got \(2, 3, 32, 32\)"):
        ControlNet.from_unet(unet, hint_downsampling=8)(x, hint, t, context)
    residuals = controlnet(x, hint, t, context)
    with pytest.raises(ValueError, match=r"5 maps .*\(64, 16, 16\)"):
        unet(x, t, context, control=residuals[:-1])
    with pytest.raises(ValueError, match="5 maps"):
        unet(x, t, context, control=[r[:, :1] for r in residuals])
    with pytest.raises(ValueError, match="multiples of 2"):
        unet(x[:, :, :31], t, context)


# ---------------------------------------------------------------------------------------------------------------------
# Feature taps
# ---------------------------------------------------------------------------------------------------------------------

def no_hooks(model):
    return all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


def test_sd15_taps_give_12_conv_maps_and_9_attention_maps():
    unet = on_meta(MODELS, "sd15")
    x, t, context, _ = sd15_inputs()
    _, conv = unet(x, t, context, taps="conv")
    assert [tuple(f.shape[1:]) for f in conv] == (
        [(1280, 8, 8)] * 3 + [(1280, 16, 16)] * 3 + [(640, 32, 32)] * 3 + [(320, 64, 64)] * 3)
    _, attn = unet(x, t, context, taps="attn")
    assert [tuple(f.shape[1:]) for f in attn] == [(1280, 16, 16)] * 3 + [(640, 32, 32)] * 3 + [(320, 64, 64)] * 3
    assert no_hooks(unet)


def test_conv_taps_are_the_resblock_branch_before_the_skip_add():
    unet = tiny_unet()
    x, t, context, _ = inputs(height=32, width=48)
    seen = []  # (block input, block output) of every decoder ResBlock
    handles = [block[0].register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
               for block in unet.output_blocks]
    out, features = unet(x, t, context, taps="conv")
    for handle in handles:
        handle.remove()
    assert len(features) == 4 and [f.shape[1:] for f in features] == [(64, 16, 24)] * 2 + [(32, 32, 48)] * 2
    for block, feature, (block_input, block_output) in zip(unet.output_blocks, features, seen):
        torch.testing.assert_close(block[0].skip_connection(block_input) + feature, block_output, rtol=0, atol=0)
    assert torch.equal(out, unet(x, t, context))
    assert no_hooks(unet)


def test_attn_taps_are_the_self_attention_output_as_maps():
    unet = tiny_unet()
    x, t, context, _ = inputs(height=32, width=48)  # not square: rows and columns must not be swapped
    tokens = []
    handles = [block[1].transformer_blocks[0].attn1.register_forward_hook(
        lambda module, args, output: tokens.append(output)) for block in unet.output_blocks[:2]]
    out, features = unet(x, t, context, taps="attn")
    for handle in handles:
        handle.remove()
    assert [f.shape for f in features] == [(2, 64, 16, 24)] * 2
    for feature, token_output in zip(features, tokens):
        assert torch.equal(feature.flatten(2).transpose(1, 2), token_output)
    # a spatial map: row r of the map is tokens r*W .. r*W + W - 1
    assert torch.equal(features[0][:, :, 1, :], tokens[0][:, 24:48].transpose(1, 2))
    assert torch.equal(out, unet(x, t, context))
    assert no_hooks(unet)


def test_taps_off_return_the_output_alone_and_leave_no_hooks():
    unet = tiny_unet()
    x, t, context, _ = inputs()
    assert isinstance(unet(x, t, context), torch.Tensor)
    with pytest.raises(ValueError, match="unknown tap mode 'ffn'"):
        unet(x, t, context, taps="ffn")
    assert no_hooks(unet)


def test_tap_gradients_reach_the_controlnet_through_the_frozen_decoder():
    unet = tiny_unet().requires_grad_(False)
    controlnet = randomise(ControlNet.from_unet(unet, hint_downsampling=1), seed=5)
    x, t, context, hint = inputs()
    _, features = unet(x, t, context, control=controlnet(x, hint, t, context), taps="attn")
    sum(f.square().mean() for f in features).backward()
    # the tiny UNet's attention taps are in decoder blocks 0 and 1 (level 1): they read skips 3 and 2 and the middle
    # block; skips 0 and 1 feed the level-0 blocks after the last tap
    assert controlnet.middle_block_out[0].weight.grad.abs().sum() > 0
    assert all(controlnet.zero_convs[k][0].weight.grad.abs().sum() > 0 for k in (2, 3))
    assert all(controlnet.zero_convs[k][0].weight.grad is None for k in (0, 1))
    assert all(p.grad is None for p in unet.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def ldm_file(unet, controlnet):
    """An original-style file: {"state_dict": ...} with the UNet under model.diffusion_model., the ControlNet under
    control_model. and another network's weights beside them."""
    state = {f"model.diffusion_model.{key}": value for key, value in unet.state_dict().items()}
    state |= {f"control_model.{key}": value for key, value in controlnet.state_dict().items()}
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(128, 3, 3, 3)
    return {"state_dict": state}


def test_original_layout_files_load_into_both_networks(tmp_path):
    unet = tiny_unet()
    controlnet = randomise(ControlNet.from_unet(unet, hint_downsampling=1), seed=6)
    path = tmp_path / "control.ckpt"
    torch.save(ldm_file(unet, controlnet), path)
    loaded_unet = load_checkpoint(MODELS["tiny"](), path)
    loaded_controlnet = load_checkpoint(CONTROLNETS["tiny"](), path)
    for original, loaded in ((unet, loaded_unet), (controlnet, loaded_controlnet)):
        assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in original.state_dict().items())


def test_a_model_on_meta_takes_the_checkpoint_tensors():
    unet = tiny_unet()
    with torch.device("meta"):
        empty = MODELS["tiny"]()
    loaded = load_checkpoint(empty, {"model": unet.state_dict()})  # train.py layout, no prefix
    x, t, context, _ = inputs()
    assert torch.equal(loaded(x, t, context), unet(x, t, context))


def test_loader_names_missing_unexpected_and_mismatched_keys_and_copies_nothing():
    unet = tiny_unet()
    state = ldm_file(unet, ControlNet.from_unet(unet, hint_downsampling=1))["state_dict"]
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.output_blocks.9.0.in_layers.0.weight"] = torch.zeros(4)
    state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"] = torch.zeros(32, 32, 1, 1)
    target = MODELS["tiny"]()
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_checkpoint(target, {"state_dict": state})
    message = str(error.value)
    assert "missing keys (1): out.2.bias" in message
    assert "unexpected keys (1): model.diffusion_model.output_blocks.9.0.in_layers.0.weight" in message
    assert ("shape mismatches (1): model.diffusion_model.input_blocks.1.0.in_layers.2.weight expected "
            "(32, 32, 3, 3), got (32, 32, 1, 1)") in message
    assert all(torch.equal(value, before[key]) for key, value in target.state_dict().items())
