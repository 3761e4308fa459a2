"""The KL autoencoder: key names and shapes of the published layouts, the LDM <-> diffusers key map, the posterior,
the attention block and the downsampling padding against independent computations, slicing, loading in every layout
and a state dict through ref/safetensors."""
import numpy as np
import pytest
import torch

from ref.safetensors import load_file, save_file
from ref.vae import MODELS, AttnBlock, Downsample, from_diffusers, load_state, native_state, to_diffusers

torch.set_num_threads(1)


def on_meta(name):
    with torch.device("meta"):
        return MODELS[name]()


def randomise(model, seed=1):
    """Random weights everywhere, GroupNorm affines included (their init, 1 and 0, would hide a swapped scale)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator) + (parameter.ndim == 1))
    return model


def tiny(seed=1):
    return randomise(MODELS["tiny"]().eval(), seed)


def ldm_shapes(ch, ch_mult, num_res_blocks, z_channels, attn_levels):
    """Key -> shape of an LDM-layout AutoencoderKL, written out from the architecture as latent diffusion describes
    it (ldm/modules/diffusionmodules/model.py, Encoder / Decoder with temb_ch 0, double_z, 3 image channels)."""
    shapes = {}

    def conv(name, c_out, c_in, k):
        shapes.update({f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)})

    def norm(name, c):
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    def resnet(name, c_in, c_out):
        norm(f"{name}.norm1", c_in), conv(f"{name}.conv1", c_out, c_in, 3)
        norm(f"{name}.norm2", c_out), conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, 1)

    def attention(name, c):
        norm(f"{name}.norm", c)
        for projection in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{projection}", c, c, 1)

    def mid(part, c):
        resnet(f"{part}.mid.block_1", c, c), attention(f"{part}.mid.attn_1", c), resnet(f"{part}.mid.block_2", c, c)

    levels = len(ch_mult)
    conv("encoder.conv_in", ch, 3, 3)
    c = ch
    for i, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", c, ch * mult)
            c = ch * mult
            if i in attn_levels:
                attention(f"encoder.down.{i}.attn.{j}", c)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder", c)
    norm("encoder.norm_out", c), conv("encoder.conv_out", 2 * z_channels, c, 3)
    conv("decoder.conv_in", c, z_channels, 3)
    mid("decoder", c)
    for i in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, ch * ch_mult[i])
            c = ch * ch_mult[i]
            if i in attn_levels:
                attention(f"decoder.up.{i}.attn.{j}", c)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", 3, c, 3)
    conv("quant_conv", 2 * z_channels, 2 * z_channels, 1), conv("post_quant_conv", z_channels, z_channels, 1)
    return shapes


def shapes_of(state):
    return {key: tuple(value.shape) for key, value in state.items()}


@pytest.mark.parametrize("name, config", [
    ("sd", dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4, attn_levels=())),
    # the VA-VAE release (hustvl/LightningDiT tokenizer/configs/vavae_f16d32.yaml): attn_resolutions [16] at
    # resolution 256 is the level at 256 / 2^4, the deepest of five
    ("vavae-f16d32", dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32, attn_levels=(4,))),
])
def test_ldm_layout_keys_and_shapes(name, config):
    model = on_meta(name)
    assert shapes_of(model.state_dict()) == ldm_shapes(**config)


def test_sd_vae_size_and_diffusers_names():
    """sd-vae-ft-mse / the SD1.x VAE: 83,653,863 parameters in 248 tensors (as published model summaries count
    diffusers' AutoencoderKL), f8, 4 latent channels; a few names and shapes as the published diffusers file has
    them."""
    model = on_meta("sd")
    assert sum(p.numel() for p in model.parameters()) == 83_653_863 and len(model.state_dict()) == 248
    assert model.downsampling_factor == 8 and model.z_channels == 4 and model.scaling_factor == 0.18215
    published = shapes_of(to_diffusers(model.state_dict(), num_levels=4))
    assert published["encoder.mid_block.attentions.0.to_q.weight"] == (512, 512)
    assert published["decoder.mid_block.attentions.0.to_out.0.weight"] == (512, 512)
    assert published["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == (256, 128, 1, 1)
    assert published["encoder.down_blocks.2.downsamplers.0.conv.weight"] == (512, 512, 3, 3)
    assert published["decoder.up_blocks.0.upsamplers.0.conv.weight"] == (512, 512, 3, 3)  # the deepest level
    assert published["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"] == (128, 256, 1, 1)  # the finest
    assert published["decoder.up_blocks.3.resnets.2.conv2.weight"] == (128, 128, 3, 3)
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in published
    assert published["encoder.conv_norm_out.weight"] == (512,) and published["decoder.conv_norm_out.weight"] == (128,)
    assert published["encoder.conv_out.weight"] == (8, 512, 3, 3) and published["quant_conv.weight"] == (8, 8, 1, 1)


@pytest.mark.parametrize("name", ["sd", "vavae-f16d32", "tiny"])
def test_diffusers_key_map_is_a_bijection_keeping_shapes(name):
    model = on_meta(name) if name != "tiny" else tiny()
    state = model.state_dict()
    published = to_diffusers(state, num_levels=len(model.encoder.down))
    assert len(published) == len(state)  # injective
    assert not any(".down." in key or ".up." in key or "nin_shortcut" in key for key in published)
    back, original = from_diffusers(published, model)
    assert list(back) == list(state) and set(original.values()) == set(published)
    for key, value in state.items():
        assert back[key].shape == value.shape, key
        assert published[original[key]].numel() == value.numel(), key
    if name == "tiny":
        assert all(torch.equal(back[key], value) for key, value in state.items())


def legacy_names(state):
    """The attention names of diffusers < 0.14 (query, key, value, proj_attn), as older published files carry."""
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    renamed = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        renamed[key] = value
    return renamed


def reference_output(model, seed=3):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        mean, logvar = model.encode(x)
        return torch.cat([mean.flatten(), logvar.flatten(), model.decode(mean).flatten()])


def test_loading_every_layout_gives_the_same_model():
    source = tiny()
    state = source.state_dict()
    diffusers = to_diffusers(state, num_levels=3)
    layouts = {
        "ldm": state,
        "diffusers": diffusers,
        "diffusers, legacy attention names": legacy_names(diffusers),
        "sd1.x checkpoint": {**{f"first_stage_model.{k}": v for k, v in state.items()},
                             "model.diffusion_model.out.0.weight": torch.zeros(3)},
        "va-vae training checkpoint": {**state, "loss.logvar": torch.zeros(()),
                                       "foundation_model.model.cls_token": torch.zeros(1, 1, 8),
                                       "linear_proj.weight": torch.zeros(8, 4, 1, 1)},
    }
    expected = reference_output(source)
    for layout, layout_state in layouts.items():
        loaded = load_state(MODELS["tiny"]().eval(), layout_state)
        assert torch.equal(reference_output(loaded), expected), layout


def test_loading_a_vae_of_another_kind_names_the_problem():
    sd_state = on_meta("sd").state_dict()
    with pytest.raises(ValueError, match="shape mismatches") as error:
        load_state(MODELS["tiny"](), {k: v for k, v in sd_state.items()})
    assert "encoder.conv_in.weight expected (32, 3, 3, 3), got (128, 3, 3, 3)" in str(error.value)
    state = to_diffusers(tiny().state_dict(), num_levels=3)
    del state["decoder.up_blocks.0.resnets.1.conv1.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing keys") as error:
        load_state(MODELS["tiny"](), state)
    assert "decoder.up.2.block.1.conv1.bias" in str(error.value) and "decoder.extra.weight" in str(error.value)
    _, original = native_state(MODELS["tiny"](), state)
    assert original["decoder.up.2.block.0.conv1.bias"] == "decoder.up_blocks.0.resnets.0.conv1.bias"


def test_encode_decode_shapes_and_slicing():
    model = tiny()
    x = torch.randn(3, 3, 24, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean, logvar = model.encode(x)
        assert mean.shape == logvar.shape == (3, 4, 6, 4)  # f4
        generator = torch.Generator().manual_seed(5)
        reconstruction = model(x, generator=generator)
        assert reconstruction.shape == x.shape
        sliced_mean, sliced_logvar = model.encode(x, slice_size=2)
        # float32 kernels round differently at another batch size (1.07e-5 seen on some CPUs); a slice mixed up with
        # another would be off by O(1)
        torch.testing.assert_close(sliced_mean, mean, rtol=0, atol=1e-4)
        torch.testing.assert_close(sliced_logvar, logvar, rtol=0, atol=1e-4)
        torch.testing.assert_close(model.decode(mean, slice_size=1), model.decode(mean), rtol=0, atol=1e-4)


def test_posterior_sample_has_the_moments_mean_and_variance():
    model = tiny()
    with torch.no_grad():
        mean, logvar = model.encode(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    n = 20000
    samples = model.sample(mean.expand(n, -1, -1, -1), logvar.expand(n, -1, -1, -1),
                           generator=torch.Generator().manual_seed(1))  # (n, 4, 4, 4)
    std = torch.exp(0.5 * logvar[0])
    assert (std.max() / std.min()) > 1.5  # the check below sees more than one variance
    assert ((samples.mean(0) - mean[0]).abs() <= 5 * std / n ** 0.5).all()
    assert ((samples.var(0) / std ** 2 - 1).abs() <= 5 * (2 / n) ** 0.5).all()


def test_logvar_clamped_as_ldm():
    model = tiny()
    with torch.no_grad():
        model.quant_conv.bias[4:] = 1e4  # logvar half of the moments
        _, high = model.encode(torch.randn(1, 3, 8, 8))
        model.quant_conv.bias[4:] = -1e4
        _, low = model.encode(torch.randn(1, 3, 8, 8))
    assert (high == 20).all() and (low == -30).all()


def test_attention_block_against_an_independent_computation():
    """The decoder's mid attention: GroupNorm(32, eps 1e-6), one head over all H*W positions, computed in float64."""
    block = tiny().decoder.mid.attn_1
    assert isinstance(block, AttnBlock)
    x = torch.randn(2, 64, 3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = block(x).double().numpy()
    p = {name: value.double().numpy() for name, value in block.state_dict().items()}
    xs = x.double().numpy()
    b, c, height, width = xs.shape
    groups = xs.reshape(b, 32, -1)
    normed = (groups - groups.mean(-1, keepdims=True)) / np.sqrt(groups.var(-1, keepdims=True) + 1e-6)
    h = normed.reshape(b, c, height * width) * p["norm.weight"][:, None] + p["norm.bias"][:, None]  # (B, C, N)

    def project(name, features):
        return np.einsum("oc,bcn->bon", p[f"{name}.weight"][:, :, 0, 0], features) + p[f"{name}.bias"][:, None]

    q, k, v = project("q", h), project("k", h), project("v", h)
    scores = np.einsum("bci,bcj->bij", q, k) / np.sqrt(c)  # (B, N queries, N keys)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bij,bcj->bci", weights, v)
    expected = xs + project("proj_out", attended).reshape(b, c, height, width)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_downsample_pads_right_and_bottom_only():
    """LDM pads (0, 1, 0, 1) before the stride-2 3x3 conv: output row 0 reads input rows 0-2, row 1 rows 2-4 (4 = pad),
    so input row 1 reaches output row 0 only (a symmetric padding of 1 would reach both)."""
    down = Downsample(32)
    x = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = down(x)
        assert y.shape == (1, 32, 2, 2)
        for row, reached in ((1, [True, False]), (2, [True, True]), (3, [False, True])):
            bumped = x.clone()
            bumped[:, :, row] += 1
            changed = (down(bumped) - y).abs().amax(dim=(0, 1, 3)) > 0
            assert changed.tolist() == reached, row


def test_state_dict_round_trips_through_safetensors(tmp_path):
    source = tiny()
    path = tmp_path / "vae.safetensors"
    save_file(to_diffusers(source.state_dict(), num_levels=3), path)
    loaded = load_state(MODELS["tiny"]().eval(), load_file(path))
    assert torch.equal(reference_output(loaded), reference_output(source))
    save_file({k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}, path)
    state = load_file(path)
    assert all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in source.state_dict().items())
