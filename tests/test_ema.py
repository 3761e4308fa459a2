"""The power-function EMA (EDM2): its exact weights and its width."""
import numpy as np
import pytest
import torch

from ref.ema import power_function_decay, power_function_gamma, update_ema


@pytest.mark.parametrize("std", [0.01, 0.05, 0.1])
def test_gamma_gives_the_requested_relative_width(std):
    gamma = power_function_gamma(std)
    assert np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(std, rel=1e-9)


def test_power_ema_weighs_step_t_by_the_power_law_increment():
    """After T updates with decay (1 - 1/t)^(gamma + 1), the average is sum_t (t^(g+1) - (t-1)^(g+1)) / T^(g+1) p_t:
    the first step is taken whole, nothing of the initial value is left, and the profile's relative std is `std`."""
    std, steps = 0.05, 400
    gamma = power_function_gamma(std)
    values = torch.randn(steps, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model, ema = torch.nn.Linear(1, 1, bias=False).double(), torch.nn.Linear(1, 1, bias=False).double()
    ema.weight.data.fill_(1e6)  # an initial value that must not survive
    for step, value in enumerate(values, start=1):
        model.weight.data.fill_(value.item())
        update_ema(ema, model, power_function_decay(gamma, step))
    t = np.arange(1, steps + 1, dtype=np.float64)
    weights = (t ** (gamma + 1) - (t - 1) ** (gamma + 1)) / steps ** (gamma + 1)
    assert weights.sum() == pytest.approx(1.0)
    assert ema.weight.item() == pytest.approx(float(weights @ values.numpy()), rel=1e-9)
    relative = t / steps
    mean = weights @ relative
    assert np.sqrt(weights @ (relative - mean) ** 2) == pytest.approx(std, rel=0.05)
