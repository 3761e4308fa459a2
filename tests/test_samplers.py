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


def test_shifted_grid_is_lightningdits_timestep_shift():
    """The release's grid re-derived in its own time (t = 0 noise): t_m = s t_n / (1 + (s - 1) t_n) on
    t_n = linspace(0, 1, N + 1), here 1 - t_m; shift 1 is the uniform grid, shift 0.3 puts most steps near noise."""
    shift, steps = 0.3, 124
    t_n = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    release = shift * t_n / (1 + (shift - 1) * t_n)
    grid = samplers.shifted_grid(steps, shift)
    torch.testing.assert_close(grid, 1 - release, rtol=0, atol=1e-12)
    assert grid[0] == 1 and grid[-1] == 0 and (grid.diff() < 0).all()
    assert (grid > 0.5).sum() > 0.75 * steps  # t > 0.5 holds u > 0.3 / 1.3: 96 of the 125 points
    assert torch.equal(samplers.shifted_grid(8, 1.0), torch.linspace(1, 0, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be positive"):
        samplers.shifted_grid(8, 0.0)


def test_heun_with_a_heun_last_step_integrates_a_linear_in_t_velocity_exactly():
    """dx/dt = t: x(0) = x(1) - 1/2. The trapezoid rule is exact on every step, the last included; an Euler last
    step from t_cur = 1/4 moves by -(1/4) v(1/4) = -1/16 instead of -1/32. Evaluations 2 * steps, one fewer with it."""
    calls = []
    velocity = lambda x, t: (calls.append(1), t[:, None].expand_as(x))[1]  # noqa: E731
    grid = samplers.shifted_grid(4, 1.0)  # 1, 3/4, 1/2, 1/4, 0
    heun_last = samplers.heun(velocity, torch.ones(2, 3), grid, model_dtype=torch.float64, euler_last=False)
    assert len(calls) == 8
    torch.testing.assert_close(heun_last, torch.full((2, 3), 0.5, dtype=torch.float64))
    calls.clear()
    euler_last = samplers.heun(velocity, torch.ones(2, 3), grid, model_dtype=torch.float64)
    assert len(calls) == 7
    torch.testing.assert_close(euler_last, torch.full((2, 3), 0.5 - 1 / 32, dtype=torch.float64))


def wavy_velocity(x, t):
    """A nonlinear stand-in for a network: any velocity field serves to compare two integrators."""
    return torch.sin(3 * x) * (1 + t[:, None]) + 0.5 * x


def seeded_randn(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


def test_production_sde_matches_the_ig_release_sampler_re_derived():
    """The IG paper's numbers come from REPA's / the IG release's euler_maruyama_sampler (SiT/samplers.py), written
    here again in its own terms: t on linspace(1, 0.04, steps) then 0; score from the velocity with alpha = 1 - t,
    sigma = t: ((t - 1) v - x) / t; diffusion g^2 = 2t; drift v - g^2 / 2 score; x += drift dt + sqrt(g^2 |dt|) z;
    the last step, 0.04 -> 0, the drift alone (the mean step). euler_maruyama on uniform_grid, with its default
    diffusion, must agree; with another g it must not."""
    steps = 12
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = torch.cat([torch.linspace(1, 0.04, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    draw = seeded_randn(1)
    x = noise.clone()
    for i in range(steps):
        t_cur, dt = times[i], times[i + 1] - times[i]
        v = wavy_velocity(x, t_cur.expand(64))
        drift = v - 0.5 * (2 * t_cur) * (((t_cur - 1) * v - x) / t_cur)
        x = x + drift * dt + ((2 * t_cur).sqrt() * dt.abs().sqrt() * draw(x) if i < steps - 1 else 0)
    ours = samplers.euler_maruyama(wavy_velocity, noise, samplers.uniform_grid(steps), model_dtype=torch.float64,
                                   randn_like=seeded_randn(1))
    assert torch.allclose(ours, x, rtol=1e-10, atol=1e-12)
    halved = samplers.euler_maruyama(wavy_velocity, noise, samplers.uniform_grid(steps), model_dtype=torch.float64,
                                     randn_like=seeded_randn(1), diffusion=lambda t: t)  # g^2 = t
    assert (halved - x).abs().mean() > 0.05


def test_sbdm_diffusion_matches_sit_s_sbdm_sampler_in_its_own_time():
    """SiT's transport code with diffusion_form "SBDM", re-derived in its time s = 1 - t (s = 0 noise): s on
    linspace(1e-3, 0.96, steps), its velocity -v(x, 1 - s), w = (1 - s) / s, score (s v - x) / (1 - s), drift
    v + w score, x += drift ds + sqrt(2 w ds) z, then the Mean step of 0.04."""
    steps = 10
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    times = torch.linspace(1e-3, 0.96, steps, dtype=torch.float64)
    ds = times[1] - times[0]
    draw = seeded_randn(3)

    def drift(x, s):
        v = -wavy_velocity(x, (1 - s).expand(64))
        return v + (1 - s) / s * (s * v - x) / (1 - s)
    x = noise.clone()
    for s in times[:-1]:
        x = x + drift(x, s) * ds + (2 * (1 - s) / s * ds).sqrt() * draw(x)
    x = x + drift(x, times[-1]) * 0.04
    grid = samplers.uniform_grid(steps, t_max=samplers.SBDM_T_MAX)
    ours = samplers.euler_maruyama(wavy_velocity, noise, grid, model_dtype=torch.float64, randn_like=seeded_randn(3),
                                   diffusion=samplers.sbdm_diffusion)
    assert torch.allclose(ours, x, rtol=1e-9, atol=1e-10)


def test_respaced_timesteps_are_dit_s_space_timesteps():
    """Hand cases: 5 of 1000 at stride 249.75 -> 0, 250, 500 (499.5 rounds half to even), 749, 999; 250 of 1000 at
    stride 999 / 249 = 4.012 -> 0, 4, 8, 12, 16, ...; all 1000 -> every step."""
    assert samplers.respaced_timesteps(1000, 5) == [0, 250, 500, 749, 999]
    dit = samplers.respaced_timesteps(1000, 250)
    assert dit[:5] == [0, 4, 8, 12, 16] and dit[-1] == 999 and len(set(dit)) == 250
    assert samplers.respaced_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError, match="cannot respace"):
        samplers.respaced_timesteps(1000, 1001)


def test_learned_variance_ancestral_sampling_on_a_respaced_schedule():
    """Values -1 select beta_tilde: the fixed-variance sampler exactly. Values +1 select beta (DDPM's larger choice):
    with the exact eps it reproduces the Gaussian on DiT's 250 respaced steps (std 0.303 for 0.3), where beta_tilde
    at this spacing under-disperses (0.286): the variance channels change the samples."""
    base = DDPMSchedule.named("linear")
    kept = samplers.respaced_timesteps(1000, 250)
    schedule = base.respaced(kept)
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = gaussian_eps(base)

    def with_values(value):
        return lambda x, t: torch.cat([exact(x, t), torch.full_like(x, value)], dim=1)

    def run(denoise, learned):
        return samplers.ddpm_ancestral(denoise, noise, schedule, model_dtype=torch.float64, model_timesteps=kept,
                                       randn_like=seeded_randn(5), learned_variance=learned)
    fixed = run(exact, False)
    assert torch.allclose(run(with_values(-1.0), True), fixed, rtol=1e-12, atol=1e-12)
    large = run(with_values(1.0), True)
    assert large.mean().item() == pytest.approx(MEAN, abs=0.01) and large.std().item() == pytest.approx(STD, rel=0.03)
    assert fixed.std() < STD * 0.97 < large.std()


def test_linspace_timesteps_are_k_times_999_over_n_rounded_half_to_even():
    """20 steps: k * 49.95 for k = 20 .. 1; 499.5 rounds to the even 500; no steps_offset."""
    assert samplers.linspace_timesteps(1000, 20).tolist() == [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500,
                                                              450, 400, 350, 300, 250, 200, 150, 100, 50]
    assert samplers.linspace_timesteps(1000, 999).tolist()[-2:] == [2, 1]
    with pytest.raises(ValueError, match="do not fit"):
        samplers.linspace_timesteps(1000, 1000)  # k = 1 would round 0.999 to 1, k = 2 to 2, .., k = 500 to 500 too


def test_unipc_follows_the_exact_probability_flow_far_closer_than_ddim():
    """Gaussian data N(MEAN, STD^2), exact eps: the probability-flow ODE keeps z = (x_t - alpha_t MEAN) /
    sqrt(alpha_t^2 STD^2 + sigma_t^2), so its solution at the last timestep is known; both samplers then jump to the
    x0 estimate there (DDIM to abar 1 from the last timestep, UniPC's final order-1 step), the posterior mean
    MEAN + alpha STD^2 / (alpha^2 STD^2 + sigma^2) (x - alpha MEAN). 20 steps: UniPC within 1e-3 of it (measured
    1e-4), DDIM's first-order error over 10 times larger (measured 0.034)."""
    schedule = DDPMSchedule.named("scaled_linear")
    timesteps = samplers.linspace_timesteps(1000, 20)
    noise = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(timesteps[:1])
    z = (noise - alpha * MEAN) / (alpha ** 2 * STD ** 2 + sigma ** 2).sqrt()
    alpha, sigma = schedule.alpha_sigma(timesteps[-1:])
    variance = alpha ** 2 * STD ** 2 + sigma ** 2
    exact = MEAN + alpha * STD ** 2 / variance * variance.sqrt() * z
    errors = [(sample(gaussian_eps(schedule), noise, schedule, timesteps, model_dtype=torch.float64) - exact)
              .abs().max() for sample in (samplers.unipc, samplers.ddim)]
    assert errors[0] < 1e-3 and errors[1] > 10 * errors[0], errors


def test_unipc_with_the_exact_x0_of_a_point_mass_stays_on_its_path_and_ends_on_it():
    """Data at one point x*: every x0 estimate is x*, so the differences vanish and each UniP / UniC step maps
    alpha_s x* + sigma_s z to alpha_t x* + sigma_t z exactly; the last step lands on x*."""
    schedule = DDPMSchedule.named("scaled_linear")
    target, z = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    timesteps = samplers.linspace_timesteps(1000, 7)
    seen = []

    def exact_x0(x, t):
        alpha, sigma = (c.reshape(-1, 1) for c in schedule.alpha_sigma(t.long()))
        seen.append((x - alpha * target) / sigma)  # z, if x is on the path
        return target.expand_as(x)
    alpha, sigma = schedule.alpha_sigma(timesteps[0])
    x = samplers.unipc(exact_x0, alpha * target + sigma * z, schedule, timesteps, prediction="x0",
                       model_dtype=torch.float64)
    assert torch.allclose(x, target, atol=1e-12)
    assert len(seen) == 7 and all(torch.allclose(z_seen, z, atol=1e-9) for z_seen in seen)
