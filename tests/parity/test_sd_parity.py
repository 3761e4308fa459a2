"""Parity with diffusers' UNet2DConditionModel and ControlNetModel: the SD1.5 names and shapes of both layouts (on the
meta device), and the same outputs at random weights through the key map in both directions, on a tiny SD-like config
(a plain level and one with attention, 4-channel latents, the 8x hint encoder). Skipped when diffusers is absent
(requirements-parity.txt installs it)."""
import pytest
import torch

from ref.controlnet import CONFIGS, ControlNet
from ref.controlnet import MODELS as CONTROLNETS
from ref.sd_checkpoints import diffusers_config, load, save_diffusers, to_diffusers
from ref.unet import MODELS, UNet

diffusers = pytest.importorskip("diffusers")

torch.set_num_threads(1)

TINY = CONFIGS["tiny"] | dict(in_channels=4)


def randomise(model, seed):
    """Every parameter N(0, 0.1^2): the zero inits (zero convs, out convs, proj_out) would hide layers."""
    count = sum(parameter.numel() for parameter in model.parameters())
    noise = 0.1 * torch.randn(count, generator=torch.Generator().manual_seed(seed))
    torch.nn.utils.vector_to_parameters(noise, model.parameters())
    return model


def diffusers_model(ours):
    config = dict(diffusers_config(ours))
    kind = getattr(diffusers, config.pop("_class_name"))
    return kind.from_config(config)


def shapes(state):
    return {key: tuple(value.shape) for key, value in state.items()}


@pytest.mark.parametrize("models", [MODELS, CONTROLNETS], ids=["unet", "controlnet"])
def test_sd15_names_and_shapes_equal_diffusers(models):
    with torch.device("meta"):
        ours = models["sd15"]()
        theirs = diffusers_model(ours)
    assert shapes(to_diffusers(ours.state_dict(), num_res_blocks=2)) == shapes(theirs.state_dict())


def inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([3, 981])
    context = torch.randn(2, 5, 32, generator=generator)
    hint = torch.rand(2, 3, 64, 64, generator=generator)
    control = [torch.randn(2, *shape, generator=generator) for shape in UNet(**TINY).residual_shapes(8, 8)]
    return x, t, context, hint, control


def unet_outputs(ours, theirs):
    x, t, context, _, control = inputs()
    with torch.no_grad():
        expected = theirs(x, t, context, down_block_additional_residuals=control[:-1],
                          mid_block_additional_residual=control[-1]).sample
        return ours(x, t, context, control=control), expected


def controlnet_outputs(ours, theirs):
    x, t, context, hint, _ = inputs()
    with torch.no_grad():
        down, middle = theirs(x, t, context, hint, conditioning_scale=0.7, return_dict=False)
        return torch.cat([r.flatten() for r in ours(x, hint, t, context, 0.7)]), torch.cat(
            [r.flatten() for r in [*down, middle]])


CASES = [(lambda: UNet(**TINY), unet_outputs), (lambda: ControlNet(**TINY, hint_downsampling=8), controlnet_outputs)]


@pytest.mark.parametrize("build, outputs", CASES, ids=["unet", "controlnet"])
def test_our_weights_written_as_a_diffusers_folder_give_diffusers_the_same_outputs(tmp_path, build, outputs):
    ours = randomise(build().eval(), seed=1)
    folder = save_diffusers(ours, tmp_path / "model")
    theirs = getattr(diffusers, diffusers_config(ours)["_class_name"]).from_pretrained(folder).eval()
    torch.testing.assert_close(*outputs(ours, theirs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build, outputs", CASES, ids=["unet", "controlnet"])
def test_diffusers_weights_loaded_here_give_the_same_outputs(build, outputs):
    ours = build().eval()
    theirs = randomise(diffusers_model(ours).eval(), seed=2)
    load(ours, theirs.state_dict())
    torch.testing.assert_close(*outputs(ours, theirs), rtol=1e-4, atol=1e-4)
