"""IG's accelerated training: the shifted final target on hand values, its sign against IG sampling, its fixed point
(IG of weight 1 / (1 - omega)), the stop-gradient, and the plain objective at omega = 0."""
import pytest
import torch

from ref.guidance import internal_guidance
from ref.ig_acceleration import accelerated_final_target, accelerated_flow_matching_loss
from ref.lightningdit import LightningDiT
from ref.losses import flow_matching_loss

torch.set_num_threads(1)


def test_shifted_target_on_hand_values():
    target = torch.tensor([1.0, 2.0, -1.0])
    ema_final = torch.tensor([3.0, 1.0, 0.0])
    ema_intermediate = torch.tensor([1.0, 1.0, 2.0])
    # v + 0.5 (D_f - D_i) = [1 + 0.5 * 2, 2 + 0, -1 + 0.5 * (-2)]
    shifted = accelerated_final_target(target, ema_final, ema_intermediate, 0.5)
    assert torch.equal(shifted, torch.tensor([2.0, 2.0, -2.0]))


def test_shift_points_where_ig_sampling_extrapolates():
    """v + omega (D_f - D_i) - v is IG's own correction D_i + w (D_f - D_i) - D_f at w = 1 + omega."""
    generator = torch.Generator().manual_seed(0)
    target, final, intermediate = torch.randn(3, 2, 4, generator=generator)
    shift = accelerated_final_target(target, final, intermediate, 0.7) - target
    assert torch.allclose(shift, internal_guidance(final, intermediate, 1.7) - final, atol=1e-6)


@pytest.mark.parametrize("omega", [0.3, 0.5, 0.8])
def test_the_shift_fed_back_settles_at_ig_of_weight_one_over_one_minus_omega(omega):
    """A final head set to its own shifted target again and again (the EMA tracking it): D_f <- u + omega (D_f - D_i)
    converges to IG of weight 1 / (1 - omega) on the plain optimum u; at omega = 1 it runs away."""
    generator = torch.Generator().manual_seed(1)
    plain, intermediate = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    final = plain.clone()
    for _ in range(200):
        final = accelerated_final_target(plain, final, intermediate, omega)
    torch.testing.assert_close(final, internal_guidance(plain, intermediate, 1 / (1 - omega)))
    final = plain.clone()
    for _ in range(200):
        final = accelerated_final_target(plain, final, intermediate, 1.0)
    assert (final - plain).abs().max() > 100 * (plain - intermediate).abs().max()


def test_loss_on_hand_values_with_stub_models():
    """One sample of two values; x0 = 0, eps = 1, so x_t = t and v = 1. Model: D_f = [2, 0], D_i = [1, 1].
    EMA: D_f = [3, 1], D_i = [1, 1]; omega = 0.5 -> final target [2, 1]. Loss = mean([0, 1]) + 0.5 mean([0, 0])."""
    final = torch.tensor([[2.0, 0.0]], requires_grad=True)
    intermediate = torch.tensor([[1.0, 1.0]], requires_grad=True)
    ema_final = torch.tensor([[3.0, 1.0]], requires_grad=True)
    ema_intermediate = torch.tensor([[1.0, 1.0]], requires_grad=True)
    seen = []

    def model(x_t, t, y):
        seen.append(x_t)
        return final, intermediate

    def ema_model(x_t, t, y):
        seen.append(x_t)
        return ema_final, ema_intermediate

    x0, eps, t = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([0.25])
    loss = accelerated_flow_matching_loss(model, ema_model, x0, t, None, eps, omega=0.5)
    assert loss.tolist() == [0.5]
    assert all(torch.equal(x_t, torch.full((1, 2), 0.25)) for x_t in seen)  # both models see the same x_t
    loss.sum().backward()
    assert final.grad.tolist() == [[0.0, -1.0]]  # d/dD_f mean((D_f - [2, 1])^2)
    assert intermediate.grad.tolist() == [[0.0, 0.0]]
    assert ema_final.grad is None and ema_intermediate.grad is None  # stop-gradient through the EMA model


def tiny_ig(seed):
    torch.manual_seed(seed)
    model = LightningDiT(input_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                         intermediate_block=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model


def test_omega_zero_is_the_plain_ig_objective():
    model, ema = tiny_ig(1), tiny_ig(2)
    generator = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 2, 3, 4, 4, generator=generator)
    t, y = torch.rand(2, generator=generator), torch.tensor([0, 5])
    plain = flow_matching_loss(model, x0, t, y, eps)
    assert torch.allclose(accelerated_flow_matching_loss(model, ema, x0, t, y, eps, omega=0.0), plain, atol=1e-6)
    shifted = accelerated_flow_matching_loss(model, ema, x0, t, y, eps, omega=1.0)
    assert not torch.allclose(shifted, plain, atol=1e-3)
    assert all(parameter.grad is None for parameter in ema.parameters())
    shifted.sum().backward()
    assert all(parameter.grad is None for parameter in ema.parameters())


def test_a_model_without_the_head_is_refused():
    plain = LightningDiT(input_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    x0 = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="intermediate head"):
        accelerated_flow_matching_loss(plain, plain, x0, torch.rand(1), torch.tensor([0]), x0, omega=0.5)
