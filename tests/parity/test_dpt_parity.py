"""Parity with transformers' DPTForDepthEstimation at random weights (ref/dpt.py), its state dict loaded into ours as
it is: the tiny hybrid and tiny large presets (the large one also at 256 px, its position embeddings resized), and
DPT-Large at full size at 128 px (the 24 x 24 position grid resized to 8 x 8; built on the meta device and filled from
one pool of draws, so that the test takes seconds). Skipped when transformers is absent (requirements-parity.txt
installs it)."""
import pytest
import torch

from ref.dpt import DPT_CONFIGS, DPTDepth

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)


def their_model(preset):
    """transformers' DPTForDepthEstimation with the preset's architecture (the hybrid's BiT maps fill stages 0, 1)."""
    config = DPT_CONFIGS[preset]
    common = dict(image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
                  num_hidden_layers=config.layers, num_attention_heads=config.heads, intermediate_size=config.mlp_size,
                  neck_hidden_sizes=list(config.neck_channels), fusion_hidden_size=config.fusion_channels,
                  readout_type="project", use_batch_norm_in_fusion_residual=False)
    if not config.hybrid:
        return transformers.DPTForDepthEstimation(transformers.DPTConfig(
            **common, backbone_out_indices=list(config.read_layers),
            reassemble_factors=list(config.reassemble_factors))).eval()
    return transformers.DPTForDepthEstimation(transformers.DPTConfig(
        **common, is_hybrid=True, backbone_out_indices=[0, 0, *config.read_layers],
        reassemble_factors=[1, 1, *config.reassemble_factors],
        backbone_featmap_shape=[1, config.stage_channels[-1], 24, 24],
        backbone_config={"global_padding": "same", "layer_type": "bottleneck", "depths": list(config.stage_depths),
                         "out_features": ["stage1", "stage2", "stage3"], "embedding_dynamic_padding": True,
                         "hidden_sizes": list(config.stage_channels), "num_groups": config.groups,
                         "embedding_size": config.stem_channels})).eval()


def random_weights(model, scale, seed=0):
    """Every parameter a slice of one pool of normal draws (its start moved on per parameter, so no two are alike)
    times `scale`, 1-d ones (biases, norm gains) around 1: seconds for DPT-Large's 343M parameters. -> model"""
    stride, parameters = 1013, list(model.parameters())
    pool = torch.randn(max(p.numel() for p in parameters) + stride * len(parameters),
                       generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for index, parameter in enumerate(parameters):
            start = index * stride
            parameter.copy_(pool[start:start + parameter.numel()].view(parameter.shape))
            parameter.mul_(scale).add_(float(parameter.ndim == 1))
    return model


def assert_same_depth(ours, theirs, size, batch=2):
    """predicted_depth of both on the same normalised pixels (batch, 3, size, size): equal to float32 precision (rtol
    1e-4, atol 1e-5 of the largest value); the output varies with the input (not the final ReLU's zeros or a
    constant)."""
    pixels = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
    with torch.no_grad():
        expected = theirs(pixel_values=pixels).predicted_depth  # (batch, size, size)
        depth = ours.predicted_depth(pixels)
    assert (expected > 0).float().mean() > 0.1 and expected.std() > 0.1 * expected.abs().mean()
    torch.testing.assert_close(depth, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("preset, sizes", [("tiny-hybrid", (384,)), ("tiny-large", (384, 256))])
def test_tiny_presets_match_transformers(preset, sizes):
    ours = random_weights(DPTDepth(config=preset), scale=0.2)
    theirs = their_model(preset)
    theirs.load_state_dict(ours.state_dict())  # strict: the same keys and shapes
    for size in sizes:  # transformers' hybrid takes only its image_size
        assert_same_depth(ours, theirs, size)


def test_dpt_large_at_full_size_matches_transformers():
    with torch.device("meta"):
        theirs, ours = their_model("dpt-large"), DPTDepth(config="dpt-large")
    theirs = random_weights(theirs.to_empty(device="cpu"), scale=0.05)
    ours.load_state_dict(theirs.state_dict(), assign=True)  # their tensors in our modules
    assert_same_depth(ours, theirs, 128, batch=1)
