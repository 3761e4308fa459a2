"""Parity of ref.samplers.unipc with diffusers' UniPCMultistepScheduler as the releases build it: `eval/eval.py` of
ControlNet++ and InnerControl calls UniPCMultistepScheduler.from_config(pipe.scheduler.config) on SD1.5's pipeline,
whose scheduler is the PNDMScheduler of runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (written out
below). The same timesteps, and for the same eps function the same sample at every step, 20 and 50 steps. Skipped
when diffusers is absent (requirements-parity.txt installs it)."""
import pytest
import torch

from ref.samplers import unipc
from ref.text_to_image import sampling_timesteps, sd15_schedule

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


def releases_scheduler(steps):
    """The pipeline loads the PNDMScheduler from its config; eval.py swaps in UniPC from that scheduler's config."""
    pipeline_scheduler = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler = diffusers.UniPCMultistepScheduler.from_config(pipeline_scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def eps_of(x, t):
    """A smooth stand-in for the UNet that depends on x and t. x (N, 4, 8, 8), t (N,)"""
    return torch.tanh(x * 0.7 + 0.001 * t.reshape(-1, 1, 1, 1).to(x.dtype))


def trajectories(scheduler, steps):
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
                      model_dtype=torch.float64))
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


@pytest.mark.parametrize("steps", [20, 50, 7])
def test_every_step_equals_diffusers_given_float64_sigmas(steps):
    """diffusers' step with this repository's float64 sigmas sqrt((1 - abar) / abar) (and 0 at the end): the update
    formulas agree to float64 rounding."""
    scheduler = releases_scheduler(steps)
    abar = sd15_schedule().abar(scheduler.timesteps)
    scheduler.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    ours, theirs = trajectories(scheduler, steps)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
