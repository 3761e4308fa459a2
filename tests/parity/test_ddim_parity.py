"""Parity of SD1.5's sampler with diffusers' DDIMScheduler configured as SD1.5's scheduler_config (scaled_linear
betas 0.00085 .. 0.012, timestep_spacing "leading", steps_offset 1, set_alpha_to_one False, eta 0): the same
timesteps and, for the same eps function, the same trajectory step by step. Skipped when diffusers is absent
(requirements-parity.txt installs it)."""
import pytest
import torch

from ref.samplers import ddim
from ref.text_to_image import sampling_timesteps, sd15_schedule

diffusers = pytest.importorskip("diffusers")


def sd15_scheduler():
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                   steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def eps_of(x, t):
    """A smooth stand-in for the UNet that depends on x and t. x (N, 4, 8, 8), t (N,)"""
    return torch.tanh(x * 0.7 + 0.001 * t.reshape(-1, 1, 1, 1).to(x.dtype))


@pytest.mark.parametrize("steps", [50, 20, 7])
def test_timesteps_and_trajectory_match_diffusers(steps):
    scheduler = sd15_scheduler()
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == sampling_timesteps(steps).tolist()

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(eps_of(x, torch.full((2,), float(t), dtype=torch.float64)), t, x, eta=0.0).prev_sample
    schedule = sd15_schedule()
    ours = ddim(lambda x_t, t: eps_of(x_t, t), noise, schedule, sampling_timesteps(steps), model_dtype=torch.float64,
                final_abar=schedule.abar(0))
    assert torch.allclose(ours, x.to(torch.float64), rtol=1e-5, atol=1e-6)
