import math

import pytest
import torch

from ref.schedules import DDPMSchedule, FlowSchedule, cosine_betas, linear_betas, scaled_linear_betas

SCHEDULES = [DDPMSchedule.named("linear"), DDPMSchedule.named("scaled_linear"), DDPMSchedule.named("cosine"),
             FlowSchedule()]


def random_times(schedule, n, generator):
    if isinstance(schedule, FlowSchedule):
        return torch.rand(n, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    return torch.randint(0, schedule.num_timesteps, (n,), generator=generator)


def test_beta_schedules_match_their_closed_forms():
    assert linear_betas()[0].item() == pytest.approx(1e-4) and linear_betas()[-1].item() == pytest.approx(0.02)
    scaled = scaled_linear_betas()
    assert scaled[0].item() == pytest.approx(0.00085) and scaled[-1].item() == pytest.approx(0.012)
    assert torch.allclose(scaled.sqrt().diff(), scaled.sqrt().diff()[0].expand(999))  # sqrt(beta) is linear
    abar = DDPMSchedule(cosine_betas()).alphas_cumprod
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):  # abar_t = f(t + 1) / f(0) wherever no beta was clipped
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_abar_decreases_from_one_to_nearly_zero():
    for schedule in SCHEDULES[:3]:
        abar = schedule.alphas_cumprod
        assert (abar.diff() < 0).all() and abar[0] > 0.99 and abar[-1] < 0.01


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["linear", "scaled_linear", "cosine", "flow"])
def test_parameterisations_round_trip(schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(64, 3, 4, 4, generator=g,
                                                                                      dtype=torch.float64)
    t = random_times(schedule, 64, g)
    x_t = schedule.add_noise(x0, eps, t)
    v = schedule.v_target(x0, eps, t)
    for kind, prediction in (("eps", eps), ("x0", x0), ("v", v)):
        x0_back, eps_back = schedule.x0_eps(x_t, prediction, t, kind)
        assert torch.allclose(x0_back, x0, atol=1e-8) and torch.allclose(eps_back, eps, atol=1e-8), kind


MEAN, STD = 0.7, 0.3  # 1D Gaussian data: p_t is Gaussian, so its score and E[eps | x_t] are closed forms


def gaussian_log_density_score(schedule, x_t, t):
    """grad_x log p_t(x) by autograd of the log-density of N(alpha MEAN, alpha^2 STD^2 + sigma^2)."""
    alpha, sigma = (c.reshape(-1, 1) for c in schedule.alpha_sigma(t))
    x = x_t.clone().requires_grad_(True)
    log_density = torch.distributions.Normal(alpha * MEAN, (alpha ** 2 * STD ** 2 + sigma ** 2).sqrt()).log_prob(x)
    return torch.autograd.grad(log_density.sum(), x)[0]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["linear", "scaled_linear", "cosine", "flow"])
def test_score_conversions_equal_the_gradient_of_the_log_density(schedule):
    """E[eps | x_t] = sigma (x_t - alpha MEAN) / (alpha^2 STD^2 + sigma^2) for Gaussian data (and the velocity
    E[eps - x0 | x_t] from it); score_from_eps and score_from_v of them must equal autograd's score."""
    g = torch.Generator().manual_seed(3)
    t = random_times(schedule, 32, g)
    x_t = 2 * torch.randn(32, 1, generator=g, dtype=torch.float64)
    alpha, sigma = (c.reshape(-1, 1) for c in schedule.alpha_sigma(t))
    eps = sigma * (x_t - alpha * MEAN) / (alpha ** 2 * STD ** 2 + sigma ** 2)
    score = gaussian_log_density_score(schedule, x_t, t)
    assert torch.allclose(schedule.score_from_eps(eps, t), score, rtol=1e-9)
    if isinstance(schedule, FlowSchedule):
        velocity = eps - (x_t - sigma * eps) / alpha  # E[eps - x0 | x_t], x0 = (x_t - sigma eps) / alpha
        assert torch.allclose(schedule.score_from_v(x_t, velocity, t), score, rtol=1e-9)


def test_flow_velocity_is_the_time_derivative_of_the_interpolant():
    g = torch.Generator().manual_seed(1)
    flow = FlowSchedule()
    x0, eps = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    t = torch.rand(16, generator=g, dtype=torch.float64).requires_grad_(True)
    x_t = flow.add_noise(x0, eps, t)
    derivative = torch.stack([torch.autograd.grad(x_t[:, i].sum(), t, retain_graph=True)[0] for i in range(2)], 1)
    assert torch.allclose(derivative, flow.v_target(x0, eps, t))


def test_posterior_and_learned_variance_on_their_closed_forms():
    """Linear betas: beta_tilde_1 = beta_1 (1 - abar_0) / (1 - abar_1) with abar_0 = 1 - beta_0 and abar_1 =
    (1 - beta_0)(1 - beta_1); the learned variance's values -1, 1 and 0 give beta_tilde, beta and their geometric
    mean."""
    schedule = DDPMSchedule.named("linear")
    beta_0, beta_1 = 1e-4, 1e-4 + (0.02 - 1e-4) / 999
    beta_tilde = beta_1 * beta_0 / (1 - (1 - beta_0) * (1 - beta_1))
    assert schedule.posterior_variance(1).item() == pytest.approx(beta_tilde, rel=1e-12)
    log_variance = schedule.learned_log_variance(torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64), 1).exp()
    assert log_variance.tolist() == pytest.approx([beta_tilde, beta_1, (beta_tilde * beta_1) ** 0.5], rel=1e-12)


def test_respaced_schedule_keeps_the_kept_abar():
    """ADM / DiT respacing: abar' of the respaced schedule is abar at the kept timesteps, so its betas are
    1 - abar_k / abar_{k-1}: the kept steps of 0, 250, 500 have abar'_1 = (1 - beta_1) ... (1 - beta_250)."""
    schedule = DDPMSchedule.named("linear")
    respaced = schedule.respaced([0, 250, 500])
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert respaced.num_timesteps == 3 and respaced.betas[0].item() == pytest.approx(betas[0], rel=1e-12)
    assert respaced.betas[1].item() == pytest.approx(1 - math.prod(1 - b for b in betas[1:251]), rel=1e-10)
    assert respaced.abar(2).item() == pytest.approx(math.prod(1 - b for b in betas[:501]), rel=1e-10)


def test_ddpm_v_is_the_rotation_of_eps_and_x0():
    schedule = DDPMSchedule.named("linear")
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,), generator=g)
    v = schedule.v_target(x0, eps, t)
    assert torch.allclose((v ** 2 + schedule.add_noise(x0, eps, t) ** 2).sum(1), (x0 ** 2 + eps ** 2).sum(1))


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        DDPMSchedule.named("sigmoid")
    with pytest.raises(ValueError, match="prediction kind"):
        FlowSchedule().x0_eps(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), "score")
