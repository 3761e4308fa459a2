"""Samplers driven by exact denoisers must reproduce the data distribution."""
import pytest
import torch

from ref import samplers
from ref.metrics import OutlierRate, precision_recall
from ref.schedules import DDPMSchedule
from toy.mixture import fractal_mixture

MEAN, STD = 0.7, 0.3  # 1D Gaussian data for the DDPM samplers, where E[eps | x_t] is closed form


def gaussian_eps(schedule):
    def denoise(x, t):
        alpha, sigma = (c.reshape(-1, 1).to(x) for c in schedule.alpha_sigma(t.long()))
        return sigma * (x - alpha * MEAN) / (alpha ** 2 * STD ** 2 + sigma ** 2)
    return denoise


@pytest.mark.parametrize("method", ["ddim", "ancestral"])  # DDIM: 250 of the 1000 steps
def test_ddpm_samplers_with_the_exact_eps_reproduce_a_gaussian(method):
    schedule = DDPMSchedule.named("linear")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    randn_like = lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)  # noqa: E731
    if method == "ancestral":
        x = samplers.ddpm_ancestral(gaussian_eps(schedule), noise, schedule, model_dtype=torch.float64,
                                    randn_like=randn_like)
    else:
        x = samplers.ddim(gaussian_eps(schedule), noise, schedule, samplers.spaced_timesteps(schedule, 250),
                          model_dtype=torch.float64)
    assert x.mean().item() == pytest.approx(MEAN, abs=0.01)
    assert x.std().item() == pytest.approx(STD, rel=0.03)


def test_ddim_with_eta_one_over_every_timestep_is_ancestral_sampling():
    schedule = DDPMSchedule.named("scaled_linear")
    noise = torch.randn(500, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def seeded():
        g = torch.Generator().manual_seed(8)
        return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)

    ancestral = samplers.ddpm_ancestral(gaussian_eps(schedule), noise, schedule, model_dtype=torch.float64,
                                        randn_like=seeded())
    ddim = samplers.ddim(gaussian_eps(schedule), noise, schedule, torch.arange(999, -1, -1), eta=1.0,
                         model_dtype=torch.float64, randn_like=seeded())
    assert torch.allclose(ddim, ancestral, atol=1e-8)


def test_ddim_clip_x0_bounds_the_estimates_and_leaves_in_range_ones_alone():
    """A point mass x0 inside [-1, 1]: its exact eps gives x0 back with or without clipping. A network that predicts
    eps = 0 claims x0 = x_t / sqrt(abar_t), far outside at high t: unclipped DDIM ends outside the range, clipped
    DDIM inside it."""
    schedule = DDPMSchedule.named("scaled_linear")
    timesteps = samplers.spaced_timesteps(schedule, 10)
    point = torch.tensor([[0.5, -0.25]], dtype=torch.float64)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def exact(x, t):
        return schedule.eps_from_x0(x.double(), point.expand_as(x), int(t[0])).float()

    def zero(x, t):
        return torch.zeros_like(x)
    for clip in (None, (-1.0, 1.0)):
        out = samplers.ddim(exact, noise, schedule, timesteps, clip_x0=clip)
        torch.testing.assert_close(out, point.expand_as(out), rtol=0, atol=1e-5)
    assert samplers.ddim(zero, noise, schedule, timesteps).abs().max() > 1.5
    assert samplers.ddim(zero, noise, schedule, timesteps, clip_x0=(-1.0, 1.0)).abs().max() <= 1.0


def test_ddpm_samplers_accept_x0_and_v_predictions():
    schedule = DDPMSchedule.named("cosine")
    eps_model = gaussian_eps(schedule)
    noise = torch.randn(256, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def as_kind(kind):
        def denoise(x, t):
            eps = eps_model(x, t)
            x0 = schedule.x0_from_eps(x, eps, t.long())
            return {"x0": x0, "v": schedule.v_target(x0, eps, t.long())}[kind]
        return denoise

    steps = samplers.spaced_timesteps(schedule, 20)
    reference = samplers.ddim(eps_model, noise, schedule, steps, model_dtype=torch.float64)
    for kind in ("x0", "v"):
        x = samplers.ddim(as_kind(kind), noise, schedule, steps, prediction=kind, model_dtype=torch.float64)
        assert torch.allclose(x, reference, atol=1e-6), kind


@pytest.fixture(scope="module")
def truth():
    g = torch.Generator().manual_seed(3)
    mixture = fractal_mixture("A")
    outliers = OutlierRate(mixture.sample(100_000, g), mixture.sample(20_000, g))
    return mixture, outliers, mixture.sample(3000, g), mixture.sample(3000, g)


def check_reproduces_mixture(x, truth):
    mixture, outliers, reference, other_true = truth
    true_precision, true_recall = precision_recall(reference, other_true)
    precision, recall = precision_recall(reference, x[:3000])
    assert outliers(x) < 0.005  # true samples score about 0.001; a trained network's about 0.1
    assert precision == pytest.approx(true_precision, abs=0.03)
    assert recall == pytest.approx(true_recall, abs=0.03)


def test_heun_with_the_exact_velocity_reproduces_the_mixture(truth):
    mixture = truth[0]
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = samplers.heun(mixture.velocity, noise, samplers.rho_grid(32), model_dtype=torch.float64)
    check_reproduces_mixture(x, truth)


def test_euler_maruyama_with_the_exact_velocity_reproduces_the_mixture(truth):
    mixture = truth[0]
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    x = samplers.euler_maruyama(mixture.velocity, noise, samplers.rho_grid(128), model_dtype=torch.float64,
                                randn_like=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    check_reproduces_mixture(x, truth)


def test_coarse_uniform_grid_misses_the_fine_structure(truth):
    """The check above can fail: a grid that is not dense near the data end leaves many samples off the branches."""
    mixture, outliers = truth[0], truth[1]
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = samplers.heun(mixture.velocity, noise, samplers.uniform_grid(8, t_min=0.1), model_dtype=torch.float64)
    assert outliers(x) > 0.05


def test_grids_and_evaluation_counts():
    grid = samplers.rho_grid(32)
    assert len(grid) == 33 and grid[0] == 1 and grid[-1] == 0 and (grid.diff() < 0).all()
    assert grid[-2].item() == pytest.approx(0.002)
    uniform = samplers.uniform_grid(250)
    assert len(uniform) == 251 and uniform[-2].item() == pytest.approx(0.04)
    calls = []
    velocity = lambda x, t: (calls.append(1), torch.zeros_like(x))[1]  # noqa: E731
    samplers.heun(velocity, torch.zeros(3, 2), grid)
    assert len(calls) == 2 * 32 - 1
    calls.clear()
    samplers.euler_maruyama(velocity, torch.zeros(3, 2), uniform)
    assert len(calls) == 250
