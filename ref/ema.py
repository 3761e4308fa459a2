"""Exponential moving average of the weights, used for sampling (Polyak averaging; DiT/SiT decay 0.9999), and the
power-function EMA of EDM2 (Karras et al. 2024), whose averaging window is a fixed fraction of the training so far."""
import numpy as np
import torch


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter; buffers are copied."""
    for p_ema, p in zip(ema_model.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - decay)
    for b_ema, b in zip(ema_model.buffers(), model.buffers()):
        b_ema.copy_(b)


def power_function_gamma(std):
    """The exponent gamma of the power-function profile (weights ~ step^gamma) whose relative standard deviation is
    `std`: std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), i.e. the largest real root of
    std^2 g^3 + 7 std^2 g^2 + (16 std^2 - 1) g + 12 std^2 - 1 = 0."""
    s2 = std ** 2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(roots[np.isreal(roots)].real.max())


def power_function_decay(gamma, step):
    """EMA decay after the update of step `step` (1, 2, ...): (1 - 1 / step)^(gamma + 1). Step 1 takes the weights
    as they are, so the average never holds the initialisation."""
    return (1 - 1 / step) ** (gamma + 1)
