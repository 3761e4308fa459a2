"""Parity with diffusers' AutoencoderKL at random weights, through the key map in both directions (the tiny preset:
two plain levels and one with attention, so DownEncoderBlock2D and AttnDownEncoderBlock2D are both exercised).
Skipped when diffusers is absent (requirements-parity.txt installs it)."""
import pytest
import torch

from ref.vae import MODELS, load_state, to_diffusers

diffusers = pytest.importorskip("diffusers")

torch.set_num_threads(1)


def diffusers_tiny():
    """diffusers' AutoencoderKL with the tiny preset's architecture; its up blocks run deepest first."""
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D")).eval()


def randomise(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator) + (parameter.ndim == 1))
    return model


def outputs_of_ours(model, x, z):
    with torch.no_grad():
        mean, logvar = model.encode(x)
        return mean, logvar, model.decode(z)


def outputs_of_diffusers(model, x, z):
    with torch.no_grad():
        posterior = model.encode(x).latent_dist
        return posterior.mean, posterior.logvar, model.decode(z).sample


def inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 16, 24, generator=generator), torch.randn(2, 4, 4, 6, generator=generator)


def assert_same_outputs(ours, theirs):
    for name, a, b in zip(("mean", "logvar", "decoded"), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_our_weights_in_diffusers_give_the_same_outputs():
    ours = randomise(MODELS["tiny"]().eval(), seed=1)
    theirs = diffusers_tiny()
    theirs.load_state_dict(to_diffusers(ours.state_dict(), num_levels=3), strict=True)  # every name as diffusers has it
    x, z = inputs()
    assert_same_outputs(outputs_of_ours(ours, x, z), outputs_of_diffusers(theirs, x, z))


def test_diffusers_weights_in_ours_give_the_same_outputs():
    theirs = randomise(diffusers_tiny(), seed=2)
    ours = load_state(MODELS["tiny"]().eval(), theirs.state_dict())
    x, z = inputs()
    assert_same_outputs(outputs_of_ours(ours, x, z), outputs_of_diffusers(theirs, x, z))


def test_sd_preset_has_diffusers_sd_vae_names_and_shapes():
    """diffusers' AutoencoderKL as sd-vae-ft-mse's config.json builds it, on the meta device."""
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        ours = MODELS["sd"]()
    published = to_diffusers(ours.state_dict(), num_levels=4)
    assert {k: tuple(v.shape) for k, v in published.items()} == {k: tuple(v.shape) for k, v in
                                                                 theirs.state_dict().items()}
