"""Parity of ref.samplers.unipc with diffusers' UniPCMultistepScheduler as the releases build it: `eval/eval.py` of
ControlNet++ and InnerControl calls UniPCMultistepScheduler.from_config(pipe.scheduler.config) on SD1.5's pipeline,
whose scheduler is the PNDMScheduler of runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (written out
below). The same timesteps, and for the same eps function the same sample at every step, 20 and 50 steps; and
ref.text_to_image.generate gives the images of diffusers' StableDiffusionControlNetPipeline with that scheduler, CFG
7.5 and a negative prompt, on the tiny networks at random weights. Skipped when diffusers is absent
(requirements-parity.txt installs it)."""
import numpy as np
import pytest
import torch
from PIL import Image

from ref import text_to_image, vae
from ref.samplers import unipc
from ref.sd_checkpoints import save_diffusers
from ref.text_to_image import sampling_timesteps, sd15_schedule
from tests.helpers import randomise

diffusers = pytest.importorskip("diffusers")

# runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def releases_scheduler(steps=None, **overrides):
    """The pipeline loads the PNDMScheduler from its config; eval.py swaps in UniPC from that scheduler's config.
    steps: set its timesteps (the pipeline does it itself); overrides: settings the releases leave at their default."""
    pipeline_scheduler = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler = diffusers.UniPCMultistepScheduler.from_config(pipeline_scheduler.config, **overrides)
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


def eps_of(x, t):
    """A smooth stand-in for the UNet that depends on x and t. x (N, 4, 8, 8), t (N,)"""
    return torch.tanh(x * 0.7 + 0.001 * t.reshape(-1, 1, 1, 1).to(x.dtype))


def trajectories(scheduler, steps, order=2):
    """Each step's sample (the network's input) and the final sample, from diffusers and from ref.samplers.unipc."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theirs, x = [], noise.clone()
    for t in scheduler.timesteps:
        theirs.append(x)
        x = scheduler.step(eps_of(x, torch.full((2,), float(t), dtype=torch.float64)), t, x).prev_sample
    theirs.append(x)
    ours = []

    def recorded_eps(x_t, t):
        ours.append(x_t)
        return eps_of(x_t, t)
    ours.append(unipc(recorded_eps, noise, sd15_schedule(), sampling_timesteps(steps, "unipc"),
                      model_dtype=torch.float64, order=order))
    return torch.stack(ours), torch.stack(theirs)


@pytest.mark.parametrize("steps", [20, 50])
def test_the_releases_configuration_and_timesteps(steps):
    scheduler = releases_scheduler(steps)
    config = scheduler.config
    assert (config.solver_order, config.solver_type, config.predict_x0, config.lower_order_final) == (2, "bh2", True,
                                                                                                      True)
    assert (config.timestep_spacing, config.final_sigmas_type, config.disable_corrector) == ("linspace", "zero", [])
    assert scheduler.timesteps.tolist() == sampling_timesteps(steps, "unipc").tolist()


@pytest.mark.parametrize("steps", [20, 50])
def test_every_step_equals_diffusers(steps):
    """diffusers keeps its sigmas in float32 (set_timesteps): agreement to float32 precision."""
    ours, theirs = trajectories(releases_scheduler(steps), steps)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps, order", [(20, 2), (50, 2), (7, 2), (20, 3), (7, 1)])
def test_every_step_equals_diffusers_given_float64_sigmas(steps, order):
    """diffusers' step with this repository's float64 sigmas sqrt((1 - abar) / abar) (and 0 at the end): the update
    formulas agree to float64 rounding, at the releases' order 2 and at orders 3 (the linear solve of UniP) and 1."""
    scheduler = releases_scheduler(steps, solver_order=order)
    abar = sd15_schedule().abar(scheduler.timesteps)
    scheduler.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    ours, theirs = trajectories(scheduler, steps, order)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def diffusers_pipeline(networks, folder):
    """StableDiffusionControlNetPipeline of the tiny networks, as eval.py builds it (no safety checker, UniPC)."""
    autoencoder = diffusers.AutoencoderKL(
        block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4, scaling_factor=0.18215,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    autoencoder.load_state_dict(vae.to_diffusers(networks.autoencoder.state_dict(), 4), strict=True)
    return diffusers.StableDiffusionControlNetPipeline(
        vae=autoencoder.eval(), text_encoder=None, tokenizer=None,
        unet=diffusers.UNet2DConditionModel.from_pretrained(save_diffusers(networks.unet, folder / "unet")),
        controlnet=diffusers.ControlNetModel.from_pretrained(save_diffusers(networks.controlnet, folder / "control")),
        scheduler=releases_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_generate_gives_the_images_of_the_diffusers_pipeline_the_releases_evaluate_with(tmp_path):
    """The text embeddings go in as prompt_embeds / negative_prompt_embeds (the text encoder has its own parity test),
    the control as a PIL image, the initial latents as `latents`; 20 UniPC steps, CFG 7.5."""
    torch.set_num_threads(1)
    builds = text_to_image.ARCHITECTURES["tiny"]
    networks = text_to_image.Networks(*(randomise(builds[name](), seed).eval()
                                        for seed, name in enumerate(text_to_image.Networks._fields)))
    generator = torch.Generator().manual_seed(0)
    context, negative = torch.randn(2, 77, 32, generator=generator), torch.randn(1, 77, 32, generator=generator)
    noise = torch.randn(2, 4, 4, 4, generator=generator)
    controls = [np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8) for seed in (0, 1)]
    hint = torch.stack([torch.from_numpy(control).permute(2, 0, 1).float() / 255 for control in controls])
    ours = text_to_image.generate(networks, context, negative, hint, noise, steps=20, cfg_scale=7.5, sampler="unipc")
    with torch.no_grad():
        theirs = diffusers_pipeline(networks, tmp_path)(
            prompt_embeds=context, negative_prompt_embeds=negative.expand(2, -1, -1),
            image=[Image.fromarray(control) for control in controls], height=32, width=32, num_inference_steps=20,
            guidance_scale=7.5, latents=noise, output_type="pt").images  # (2, 3, 32, 32) in [0, 1]
    assert ((theirs > 0) & (theirs < 1)).float().mean() > 0.2  # not all clamped
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, rtol=0, atol=5e-5)  # diffusers steps in float32
    without_negative = text_to_image.generate(networks, context, torch.zeros_like(negative), hint, noise, steps=20,
                                              cfg_scale=7.5, sampler="unipc")
    assert ((without_negative / 2 + 0.5).clamp(0, 1) - theirs).abs().max() > 1e-2
