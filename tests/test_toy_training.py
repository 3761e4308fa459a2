"""The toy's training target: the exact velocity of the noisy mixture, per sample and per label, and what it buys."""
import math

import torch

from ref.schedules import FlowSchedule
from toy.mixture import equal_mixture, fractal_mixture
from toy.model import ToyDenoiser
from toy.run import CONFIGS
from toy.training import LOGIT_T_MEAN, LOGIT_T_STD, exact_velocity, target_pool, train, training_batch

CLASSES = [fractal_mixture("A"), fractal_mixture("B")]
LABEL_MIXTURES = CLASSES + [equal_mixture(CLASSES)]


def noisy_points(n, seed, dtype=torch.float64):
    """Training-like points: x_t of the label's mixture at logit-normal t, labels 0, 1 and the null label 2."""
    g = torch.Generator().manual_seed(seed)
    x0, y = training_batch(CLASSES, n, g)
    t = torch.sigmoid(LOGIT_T_MEAN + LOGIT_T_STD * torch.randn(n, generator=g)).clamp(0.002, 0.98)
    y = torch.where(torch.rand(n, generator=g) < 0.3, torch.full_like(y, 2), y)
    x_t = FlowSchedule().add_noise(x0.double(), torch.randn(n, 2, generator=g, dtype=torch.float64), t.double())
    return x_t.to(dtype), t.to(dtype), y


def test_exact_targets_are_the_velocity_of_the_noisy_log_density():
    """v = E[eps - x0 | x_t] = -(t grad log p_t(x_t | y) + x_t) / (1 - t), each sample at its own t; the null label's
    density is built here as log((p_A + p_B) / 2) from the two classes, not from the mixture the targets use."""
    x, t, y = noisy_points(300, seed=0)
    x_grad = x.clone().requires_grad_(True)
    log_p_a, log_p_b = CLASSES[0].log_prob(x_grad, t), CLASSES[1].log_prob(x_grad, t)
    log_p_null = torch.logaddexp(log_p_a, log_p_b) - math.log(2)
    log_p = torch.stack([log_p_a, log_p_b, log_p_null], 1).gather(1, y[:, None]).squeeze(1)
    (score,) = torch.autograd.grad(log_p.sum(), x_grad)
    expected = -(t[:, None] * score + x) / (1 - t[:, None])
    velocity = exact_velocity(LABEL_MIXTURES, x, t, y)
    assert torch.allclose(velocity, expected, rtol=1e-7, atol=1e-7 * expected.abs().max().item())
    # the float32 targets used in training agree to float32 precision
    velocity32 = exact_velocity(LABEL_MIXTURES, x.float(), t.float(), y)
    assert velocity32.dtype == torch.float32
    assert torch.allclose(velocity32.double(), expected, atol=2e-4 * expected.abs().max().item())


def test_exact_targets_train_a_better_model_than_noisy_ones():
    """At the quick configuration's iterations, batch and pool, the model (energy heads) trained on the exact target is
    closer to the exact velocity (on fresh training-like points, final and IG heads) than the one trained on eps - x0
    (measured: squared error 0.27 against 0.41 for the final head, 0.32 against 0.41 for the IG head)."""
    iterations, batch, pool_size = (CONFIGS["quick"][key] for key in ("main_iterations", "batch", "pool_size"))
    x, t, y = noisy_points(2000, seed=1, dtype=torch.float32)
    truth = exact_velocity(LABEL_MIXTURES, x, t, y)
    errors = {}
    for target in ("exact", "noisy"):
        torch.manual_seed(0)
        model = train(ToyDenoiser(), target_pool(CLASSES, pool_size, seed=0, target=target), iterations,
                      batch=batch, seed=0, log=None)
        final, intermediate = model(x, t, y)
        errors[target] = [(head - truth).square().sum(1).mean().item() for head in (final, intermediate)]
    assert errors["exact"][0] < 0.8 * errors["noisy"][0] and errors["exact"][1] < 0.8 * errors["noisy"][1], errors
