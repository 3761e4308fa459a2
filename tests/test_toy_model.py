"""The toy denoiser's heads: the energy parameterisation gives velocities of densities, the Gaussian base is exact."""
import pytest
import torch

from toy.mixture import GaussianMixture
from toy.model import SIGMA_DATA, ToyDenoiser, gaussian_velocity


def points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.rand(n, generator=g) * 0.98 + 0.01, torch.randint(3, (n,), generator=g)


@pytest.mark.parametrize("t", [0.01, 0.3, 0.7, 0.99])
def test_gaussian_velocity_is_the_exact_velocity_of_the_base_gaussian(t):
    base = GaussianMixture([1.0], [[0.0, 0.0]], [SIGMA_DATA ** 2 * torch.eye(2).numpy()])
    x = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = base.velocity(x, torch.full((100,), t, dtype=torch.float64))
    assert torch.allclose(gaussian_velocity(x, torch.full((100, 1), t, dtype=torch.float64)), expected, atol=1e-10)


def test_untrained_energy_heads_are_the_gaussian_base():
    model = ToyDenoiser(parameterisation="energy").eval()  # both gains start at 0
    x, t, y = points()
    final, intermediate = model(x, t, y)
    base = gaussian_velocity(x, t[:, None].clamp(1e-5, 1 - 1e-5))
    assert torch.equal(final, base) and torch.equal(intermediate, base)


def jacobian_of_learned_part(model, x, t, y, head):
    """d(v - v_gaussian)/dx for each point, (N, 2, 2), through autograd of the model's own output."""
    rows = []
    for i in range(len(x)):
        def learned(xi):
            out = model(xi[None], t[i:i + 1], y[i:i + 1])[head]
            return (out - gaussian_velocity(xi[None], t[i:i + 1, None]))[0]
        rows.append(torch.autograd.functional.jacobian(learned, x[i]))
    return torch.stack(rows)


def test_energy_heads_are_gradient_fields_and_velocity_heads_are_not():
    """v - v_gaussian = -grad of a scalar, so its Jacobian is symmetric (the negative Hessian of the learned energy);
    a linear velocity head has no such constraint."""
    torch.manual_seed(0)
    x, t, y = points(8)
    energy = ToyDenoiser(parameterisation="energy").train()  # training mode keeps the graph of the inner gradient
    velocity = ToyDenoiser(parameterisation="velocity").train()
    for model in (energy, velocity):  # weights large enough for the learned part to stand out of the round-off
        for parameter in model.parameters():
            torch.nn.init.normal_(parameter, std=0.3)
    for head in (0, 1):
        j = jacobian_of_learned_part(energy, x, t, y, head)
        assert j.abs().max() > 1e-2 and torch.allclose(j, j.transpose(1, 2), atol=1e-5 * j.abs().max())
        j = jacobian_of_learned_part(velocity, x, t, y, head)
        assert (j - j.transpose(1, 2)).abs().max() > 1e-2 * j.abs().max()


def test_training_mode_is_differentiable_and_eval_mode_gives_the_same_values():
    torch.manual_seed(0)
    model = ToyDenoiser(parameterisation="energy")
    torch.nn.init.normal_(model.final_head.gain)
    x, t, y = points()
    final, intermediate = model.train()(x, t, y)
    (final.square().sum() + intermediate.square().sum()).backward()
    assert model.final_head.gain.grad.abs() > 0 and model.layers[0].weight.grad.abs().sum() > 0
    eval_final, eval_intermediate = model.eval()(x, t, y)
    assert not eval_final.requires_grad and torch.allclose(eval_final, final.detach())
    assert torch.allclose(eval_intermediate, intermediate.detach())
