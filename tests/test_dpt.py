"""DPT depth (ref/dpt.py): the Intel/dpt-hybrid-midas and Intel/dpt-large key layouts and parameter counts (full
presets on the meta device), TF 'SAME' padding and weight standardisation on hand-checked cases, ControlNet++'s input
normalisation and the max-normalised output, the forward at 512 px on a tiny config with gradients reaching the image,
weights files (.bin and .safetensors) of both presets, a file for another task and one of the other preset refused by
name. Parity with transformers' DPTForDepthEstimation: tests/parity/test_dpt_parity.py."""
import json

import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import ref.dpt
from ref.dpt import DPTDepth, StandardisedConv2d, pad_same
from tests.helpers import randomise

# transformers' DPTForDepthEstimation with the configs of Intel/dpt-hybrid-midas (counted with transformers 4.46.3 at
# random weights; the notes give the same figure) and Intel/dpt-large (transformers 5.25.0, on the meta device).
PUBLIC_PARAMETERS = {"dpt-hybrid-midas": 122_377_985, "dpt-large": 343_030_465}


def bit_stem_layout():
    """The hybrid's BiT stem: its keys and shapes."""
    layout, bit = {}, "dpt.embeddings.backbone.bit."
    layout[bit + "embedder.convolution.weight"] = (64, 3, 7, 7)
    layout.update({bit + f"embedder.norm.{p}": (64,) for p in ("weight", "bias")})
    in_channels = 64
    for stage, (depth, out_channels) in enumerate(zip((3, 4, 9), (256, 512, 1024))):
        middle = out_channels // 4
        for block in range(depth):
            prefix = f"{bit}encoder.stages.{stage}.layers.{block}."
            if block == 0:
                layout[prefix + "downsample.conv.weight"] = (out_channels, in_channels, 1, 1)
                layout.update({prefix + f"downsample.norm.{p}": (out_channels,) for p in ("weight", "bias")})
            for index, (c_in, c_out, k) in enumerate(((in_channels if block == 0 else out_channels, middle, 1),
                                                      (middle, middle, 3), (middle, out_channels, 1)), start=1):
                layout[prefix + f"conv{index}.weight"] = (c_out, c_in, k, k)
                layout.update({prefix + f"norm{index}.{p}": (c_out,) for p in ("weight", "bias")})
        in_channels = out_channels
    return layout


def public_layout(preset):
    """The file's keys and shapes, written from the public description of each model (hybrid: a BiT stem, ViT-B/16,
    BiT maps for reassemble stages 0 and 1; large: a 16 x 16 patch conv, ViT-L/16, all four stages from tokens)."""
    hybrid = preset == "dpt-hybrid-midas"
    width, layers, mlp = (768, 12, 3072) if hybrid else (1024, 24, 4096)
    neck = (256, 512, 768, 768) if hybrid else (256, 512, 1024, 1024)
    layout = {"dpt.embeddings.cls_token": (1, 1, width), "dpt.embeddings.position_embeddings": (1, 577, width)}
    if hybrid:
        layout.update(bit_stem_layout())
        layout["dpt.embeddings.projection.weight"] = (768, 1024, 1, 1)
        layout["dpt.embeddings.projection.bias"] = (768,)
    else:
        layout["dpt.embeddings.patch_embeddings.projection.weight"] = (1024, 3, 16, 16)
        layout["dpt.embeddings.patch_embeddings.projection.bias"] = (1024,)
    for layer in range(layers):
        prefix = f"dpt.encoder.layer.{layer}."
        for name, (c_out, c_in) in {"attention.attention.query": (width, width), "attention.attention.key":
                                    (width, width), "attention.attention.value": (width, width),
                                    "attention.output.dense": (width, width), "intermediate.dense": (mlp, width),
                                    "output.dense": (width, mlp)}.items():
            layout[prefix + name + ".weight"], layout[prefix + name + ".bias"] = (c_out, c_in), (c_out,)
        for norm in ("layernorm_before", "layernorm_after"):
            layout.update({prefix + f"{norm}.{p}": (width,) for p in ("weight", "bias")})
    layout.update({f"dpt.layernorm.{p}": (width,) for p in ("weight", "bias")})
    stage = "neck.reassemble_stage."
    for index in (2, 3) if hybrid else range(4):  # the hybrid's stages 0 and 1 are BiT maps: nothing to learn
        layout[stage + f"readout_projects.{index}.0.weight"] = (width, 2 * width)
        layout[stage + f"readout_projects.{index}.0.bias"] = (width,)
        layout[stage + f"layers.{index}.projection.weight"] = (neck[index], width, 1, 1)
        layout[stage + f"layers.{index}.projection.bias"] = (neck[index],)
    # factor 4 and 2: transposed convs of that kernel and stride; factor 1: none; factor 0.5: a 3x3 stride-2 conv
    for index, kernel in ({3: 3} if hybrid else {0: 4, 1: 2, 3: 3}).items():
        layout[stage + f"layers.{index}.resize.weight"] = (neck[index], neck[index], kernel, kernel)
        layout[stage + f"layers.{index}.resize.bias"] = (neck[index],)
    for index, channels in enumerate(neck):
        layout[f"neck.convs.{index}.weight"] = (256, channels, 3, 3)
    for index in range(4):
        prefix = f"neck.fusion_stage.layers.{index}."
        layout[prefix + "projection.weight"], layout[prefix + "projection.bias"] = (256, 256, 1, 1), (256,)
        for unit in ("residual_layer1", "residual_layer2"):
            for conv in ("convolution1", "convolution2"):
                layout[prefix + f"{unit}.{conv}.weight"] = (256, 256, 3, 3)
                layout[prefix + f"{unit}.{conv}.bias"] = (256,)
    for index, (c_out, c_in, k) in {0: (128, 256, 3), 2: (32, 128, 3), 4: (1, 32, 1)}.items():
        layout[f"head.head.{index}.weight"], layout[f"head.head.{index}.bias"] = (c_out, c_in, k, k), (c_out,)
    return layout


def randomised(model, seed=0):
    """Every parameter perturbed (the zero position embeddings, unit GroupNorm gains included)."""
    flat = parameters_to_vector(model.parameters())
    noise = torch.randn(flat.shape, generator=torch.Generator().manual_seed(seed))
    vector_to_parameters(flat + 0.05 * noise, model.parameters())
    return model


@pytest.fixture(scope="module")
def tiny():
    return randomised(DPTDepth(config="tiny-hybrid"))


@pytest.mark.parametrize("preset", PUBLIC_PARAMETERS)
def test_layout_and_parameter_count_match_the_public_model(preset):
    with torch.device("meta"):
        state = DPTDepth(config=preset).state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == public_layout(preset)
    assert sum(value.numel() for value in state.values()) == PUBLIC_PARAMETERS[preset]


def test_same_padding_matches_tf():
    # TF 'SAME': out = ceil(n / s), total pad = max((out - 1) s + k - n, 0), the odd pixel after.
    x = torch.zeros(1, 1, 384, 96)
    assert pad_same(x, 7, 2).shape[-2:] == (384 + 5, 96 + 5)  # 5 = 191 * 2 + 7 - 384: 2 before, 3 after
    assert pad_same(x, 3, 2).shape[-2:] == (385, 97)
    assert pad_same(x, 1, 2).shape[-2:] == (384, 96)
    padded = pad_same(torch.ones(1, 1, 4, 4), 7, 2)  # total 5
    assert padded[0, 0, 2:6, 2:6].eq(1).all() and padded.sum() == 16 and padded.shape[-1] == 9


def test_weight_standardisation_ignores_filter_scale_and_offset():
    # Standardised filters are unchanged by w -> a w + b (a > 0, b per filter), so the conv output is too; the
    # standardised filters have zero mean and unit (biased) variance, so a constant input gives 0 everywhere.
    torch.manual_seed(0)
    conv = StandardisedConv2d(4, 6, 3)
    x = torch.randn(2, 4, 9, 9)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(3.7).add_(torch.randn(6, 1, 1, 1))
    torch.testing.assert_close(conv(x), before, rtol=1e-4, atol=1e-4)
    inner = conv(torch.ones(1, 4, 9, 9))[..., 1:-1, 1:-1]  # away from the zero padding
    torch.testing.assert_close(inner, torch.zeros_like(inner), rtol=0, atol=1e-4)


def test_controlnet_plus_plus_input_normalisation_and_max_normalised_output(tiny, monkeypatch):
    seen = []
    ramp = torch.linspace(0.1, 1.0, 384)

    def fake_depth(pixels):  # (B, 3, 384, 384) -> (B, 384, 384): sample b is (b + 1) x a horizontal ramp
        seen.append(pixels)
        return torch.stack([(b + 1) * ramp.expand(384, -1) for b in range(len(pixels))])

    monkeypatch.setattr(tiny, "predicted_depth", fake_depth)
    image = torch.tensor([0.75, 0.0]).reshape(2, 1, 1, 1).expand(2, 3, 512, 512)
    depth = tiny(image)
    assert seen[0].shape == (2, 3, 384, 384)
    torch.testing.assert_close(seen[0][0], torch.full((3, 384, 384), 0.5))  # (0.75 - 0.5) / 0.5
    torch.testing.assert_close(seen[0][1], torch.full((3, 384, 384), -1.0))
    assert depth.shape == (2, 1, 512, 512)
    torch.testing.assert_close(depth[0], depth[1])  # each sample over its own maximum: the scale is gone
    assert depth.amax() == pytest.approx(1.0) and depth[0, 0, 0, 0] == pytest.approx(0.1, abs=2e-3)
    assert tiny(image, size=(64, 96)).shape == (2, 1, 64, 96)


def test_forward_at_512_px_with_gradients_to_the_image(tiny):
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(1)).requires_grad_()
    depth = tiny(image)
    assert depth.shape == (1, 1, 512, 512)
    assert depth.min() >= 0 and depth.amax().item() == pytest.approx(1.0) and depth.std() > 0
    target = torch.rand(1, 1, 512, 512, generator=torch.Generator().manual_seed(2))
    (depth - target).square().mean().backward()  # the depth reward's MSE on max-normalised maps
    assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in tiny.parameters())


def test_other_input_sizes_resize_the_position_embeddings(tiny):
    with torch.no_grad():
        assert tiny.predicted_depth(torch.randn(1, 3, 320, 448)).shape == (1, 320, 448)  # a 20 x 28 patch grid


def write_safetensors(state, path):
    """The format written out by hand: 8-byte header length, JSON header, raw little-endian data."""
    header, chunks, offset = {}, [], 0
    for name, tensor in state.items():
        data = tensor.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks))


def test_weights_files_load_and_other_tasks_are_refused(tiny, tmp_path):
    image = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        expected = tiny(image)
    torch.save(tiny.state_dict(), tmp_path / "pytorch_model.bin")
    write_safetensors(tiny.state_dict(), tmp_path / "model.safetensors")
    for name in ("pytorch_model.bin", "model.safetensors"):
        with torch.no_grad():
            loaded = DPTDepth(str(tmp_path / name), config="tiny-hybrid")(image)
        torch.testing.assert_close(loaded, expected, rtol=0, atol=0)
    hed = tmp_path / "ControlNetHED_Apache2.pth"
    torch.save({"norm": torch.zeros(1, 3, 1, 1), "block1.convs.0.weight": torch.zeros(64, 3, 3, 3)}, hed)
    with pytest.raises(ValueError, match=r"ControlNetHED_Apache2\.pth holds the HED annotator's weights .*, not DPT "
                                         r"depth weights \(dpt\.\* keys\)"):
        DPTDepth(str(hed), config="tiny-hybrid")
    damaged = dict(tiny.state_dict())
    del damaged["head.head.4.bias"]
    damaged["neck.convs.3.weight"] = damaged["neck.convs.3.weight"][:, :8]
    torch.save(damaged, tmp_path / "damaged.bin")
    with pytest.raises(ValueError, match=r"(?s)damaged.bin: checkpoint does not fit .*missing keys \(1\): head.head.4"
                                         r".bias.*neck.convs.3.weight expected \(16, 32, 3, 3\), got \(16, 8, 3, 3\)"):
        DPTDepth(str(tmp_path / "damaged.bin"), config="tiny-hybrid")


OTHER_PRESET = {  # what the file holds, as the refusal names it
    "tiny-hybrid": r"holds DPT-Hybrid depth weights \(Intel/dpt-hybrid-midas, the reward model: "
                   r"dpt\.embeddings\.backbone\.bit\.\* keys\), not DPT-Large depth weights \(model\.safetensors of "
                   r"Intel/dpt-large, from huggingface\.co/Intel/dpt-large: dpt\.embeddings\.patch_embeddings\.\* keys\)$",
    "tiny-large": r"holds DPT-Large depth weights \(.*\), not DPT-Hybrid depth weights \(Intel/dpt-hybrid-midas",
}


def test_large_weights_load_and_a_file_of_the_other_preset_is_refused_before_the_build(tiny, tmp_path, monkeypatch):
    large = randomise(DPTDepth(config="tiny-large"), seed=3, scale=0.2)
    image = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = large(image)
    assert expected.shape == (1, 1, 96, 96) and expected.amax().item() == pytest.approx(1.0) and expected.std() > 0
    files = {"tiny-hybrid": tmp_path / "hybrid.safetensors", "tiny-large": tmp_path / "large.safetensors"}
    write_safetensors(tiny.state_dict(), files["tiny-hybrid"])
    write_safetensors(large.state_dict(), files["tiny-large"])
    with torch.no_grad():
        torch.testing.assert_close(DPTDepth(str(files["tiny-large"]), config="tiny-large")(image), expected,
                                   rtol=0, atol=0)
    monkeypatch.setattr(ref.dpt, "ViT", None)  # building the network now fails otherwise than by a refusal
    for held, expected_preset in (("tiny-hybrid", "tiny-large"), ("tiny-large", "tiny-hybrid")):
        with pytest.raises(ValueError, match=OTHER_PRESET[held]):
            DPTDepth(str(files[held]), config=expected_preset)
