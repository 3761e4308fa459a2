"""DPT-Hybrid depth (ref/dpt.py): the Intel/dpt-hybrid-midas key layout and parameter count (full preset on the meta
device), TF 'SAME' padding and weight standardisation on hand-checked cases, ControlNet++'s input normalisation and the
max-normalised output, the forward at 512 px on a tiny config with gradients reaching the image, weights files (.bin
and .safetensors) and a file for another task refused by name. With transformers installed (optional, not a run-time
dependency), the tiny config is compared with its DPTForDepthEstimation at random weights."""
import json

import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ref.dpt import DPT_CONFIGS, DPTHybridDepth, StandardisedConv2d, pad_same

# transformers' DPTForDepthEstimation with the hybrid config of Intel/dpt-hybrid-midas, counted with transformers
# 4.46.3 at random weights (the notes give the same figure).
PUBLIC_PARAMETERS = 122_377_985


def public_layout():
    """The file's keys and shapes, written from the public description of the hybrid model."""
    layout = {"dpt.embeddings.cls_token": (1, 1, 768), "dpt.embeddings.position_embeddings": (1, 577, 768)}
    bit = "dpt.embeddings.backbone.bit."
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
    layout["dpt.embeddings.projection.weight"] = (768, 1024, 1, 1)
    layout["dpt.embeddings.projection.bias"] = (768,)
    for layer in range(12):
        prefix = f"dpt.encoder.layer.{layer}."
        for name, (c_out, c_in) in {"attention.attention.query": (768, 768), "attention.attention.key": (768, 768),
                                    "attention.attention.value": (768, 768), "attention.output.dense": (768, 768),
                                    "intermediate.dense": (3072, 768), "output.dense": (768, 3072)}.items():
            layout[prefix + name + ".weight"], layout[prefix + name + ".bias"] = (c_out, c_in), (c_out,)
        for norm in ("layernorm_before", "layernorm_after"):
            layout.update({prefix + f"{norm}.{p}": (768,) for p in ("weight", "bias")})
    layout.update({f"dpt.layernorm.{p}": (768,) for p in ("weight", "bias")})
    stage = "neck.reassemble_stage."
    for index in (2, 3):  # stages 0 and 1 are the BiT maps: nothing to learn
        layout[stage + f"readout_projects.{index}.0.weight"] = (768, 1536)
        layout[stage + f"readout_projects.{index}.0.bias"] = (768,)
        layout[stage + f"layers.{index}.projection.weight"] = (768, 768, 1, 1)
        layout[stage + f"layers.{index}.projection.bias"] = (768,)
    layout[stage + "layers.3.resize.weight"] = (768, 768, 3, 3)  # factor 0.5: a stride-2 conv; factor 1: none
    layout[stage + "layers.3.resize.bias"] = (768,)
    for index, channels in enumerate((256, 512, 768, 768)):
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
    return randomised(DPTHybridDepth(config="tiny"))


def test_layout_and_parameter_count_match_the_public_model():
    with torch.device("meta"):
        state = DPTHybridDepth().state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == public_layout()
    assert sum(value.numel() for value in state.values()) == PUBLIC_PARAMETERS


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
            loaded = DPTHybridDepth(str(tmp_path / name), config="tiny")(image)
        torch.testing.assert_close(loaded, expected, rtol=0, atol=0)
    hed = tmp_path / "ControlNetHED_Apache2.pth"
    torch.save({"norm": torch.zeros(1, 3, 1, 1), "block1.convs.0.weight": torch.zeros(64, 3, 3, 3)}, hed)
    with pytest.raises(ValueError, match=r"ControlNetHED_Apache2\.pth holds the HED annotator's weights .*, not DPT "
                                         r"depth weights \(dpt\.\* keys\)"):
        DPTHybridDepth(str(hed), config="tiny")
    damaged = dict(tiny.state_dict())
    del damaged["head.head.4.bias"]
    damaged["neck.convs.3.weight"] = damaged["neck.convs.3.weight"][:, :8]
    torch.save(damaged, tmp_path / "damaged.bin")
    with pytest.raises(ValueError, match=r"(?s)damaged.bin: checkpoint does not fit .*missing keys \(1\): head.head.4"
                                         r".bias.*neck.convs.3.weight expected \(16, 32, 3, 3\), got \(16, 8, 3, 3\)"):
        DPTHybridDepth(str(tmp_path / "damaged.bin"), config="tiny")


def test_matches_transformers_at_random_weights(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")  # optional parity check, not a run-time dependency
    config = DPT_CONFIGS["tiny"]
    theirs = transformers.DPTForDepthEstimation(transformers.DPTConfig(
        is_hybrid=True, image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, intermediate_size=config.mlp_size,
        backbone_out_indices=[0, 0, *config.read_layers], neck_hidden_sizes=list(config.neck_channels),
        reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=config.fusion_channels, readout_type="project",
        use_batch_norm_in_fusion_residual=False, backbone_featmap_shape=[1, config.stage_channels[-1], 24, 24],
        backbone_config={"global_padding": "same", "layer_type": "bottleneck", "depths": list(config.stage_depths),
                         "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True,
                         "hidden_sizes": list(config.stage_channels), "num_groups": config.groups,
                         "embedding_size": config.stem_channels})).eval()
    theirs.load_state_dict(tiny.state_dict())
    pixels = torch.rand(2, 3, 384, 384) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(tiny.predicted_depth(pixels), theirs(pixel_values=pixels).predicted_depth,
                                   rtol=1e-4, atol=1e-5)
