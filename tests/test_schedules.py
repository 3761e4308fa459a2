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
    _, sigma = schedule.alpha_sigma(t)
    assert torch.allclose(schedule.score_from_eps(eps, t), -eps / sigma.reshape(-1, 1, 1, 1))


def test_flow_velocity_is_the_time_derivative_of_the_interpolant():
    g = torch.Generator().manual_seed(1)
    flow = FlowSchedule()
    x0, eps = torch.randn(16, 2, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    t = torch.rand(16, generator=g, dtype=torch.float64).requires_grad_(True)
    x_t = flow.add_noise(x0, eps, t)
    derivative = torch.stack([torch.autograd.grad(x_t[:, i].sum(), t, retain_graph=True)[0] for i in range(2)], 1)
    assert torch.allclose(derivative, flow.v_target(x0, eps, t))
    # score from v: -((1 - t) v + x_t) / t, as written in the IG notes
    t = t.detach()
    x_t, v = flow.add_noise(x0, eps, t), flow.v_target(x0, eps, t)
    assert torch.allclose(flow.score_from_v(x_t, v, t), -((1 - t[:, None]) * v + x_t) / t[:, None])


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
