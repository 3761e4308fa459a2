"""Training the toy denoisers as the Autoguidance toy does, moved to the flow schedule: regression onto the exact
velocity of the noisy mixture (its closed form, toy/mixture.py) at points drawn from it, with the IG auxiliary loss,
label dropout for CFG, an Adam schedule and power-function EMA weights.

The Autoguidance toy regresses the exact score with the loss sigma^2 |s_net - s|^2; under x_t = (1 - t) x0 + t eps the
velocity is v = -(t s + x_t) / (1 - t), so |v_net - v|^2 = sigma^2 |s_net - s|^2 with sigma = t / (1 - t): the same
loss, written on the velocity. target="noisy" trains on the single-sample target eps - x0 instead (plain flow matching,
the old recipe), whose expectation given x_t is the same exact velocity.

The targets do not depend on the model, so they are computed once, for a pool of training points (target_pool), and
every model of a run draws its minibatches from that pool: the exact velocity costs far more than a training step
(~50 ns per (sample, component) pair, 1,016 components a class), and each point is used several times (in
toy.run's default run, ten times by each model) instead of once.
"""
import copy
import time

import torch

from ref.ema import power_function_decay, power_function_gamma, update_ema
from ref.losses import drop_labels, internal_guidance_loss
from ref.schedules import FlowSchedule
from toy.mixture import equal_mixture

# Noise levels as in the Autoguidance toy: ln(sigma) ~ N(-2.3, 1.5^2) with sigma = t / (1 - t), i.e. logit(t) normal.
LOGIT_T_MEAN, LOGIT_T_STD = -2.3, 1.5
TARGETS = ("exact", "noisy")
FLOW = FlowSchedule()


def training_batch(mixtures, batch, generator):
    """Labels uniform over the classes, x0 exact samples of each label's mixture. -> x0 (B, 2) float32, y (B,) long"""
    y = torch.randint(len(mixtures), (batch,), generator=generator)
    x0 = torch.zeros(batch, 2, dtype=torch.float64)
    for label, mixture in enumerate(mixtures):
        index = (y == label).nonzero().squeeze(1)
        x0[index] = mixture.sample(len(index), generator)
    return x0.float(), y


def exact_velocity(label_mixtures, x_t, t, y):
    """E[eps - x0 | x_t, y] with label_mixtures[y] the law of x0 given label y (the null label's: all classes).
    x_t: (B, 2), t: (B,), y: (B,) -> (B, 2) in x_t's dtype"""
    velocity = torch.empty_like(x_t)
    for label, mixture in enumerate(label_mixtures):
        index = (y == label).nonzero().squeeze(1)
        velocity[index] = mixture.velocity(x_t[index], t[index])
    return velocity


def target_pool(mixtures, size, seed, label_dropout=0.1, target="exact"):
    """`size` training points and their targets: labels uniform over the classes (each dropped to the null label
    len(mixtures), ToyDenoiser's, with probability `label_dropout`, for CFG), x0 exact samples of each label's
    mixture, t logit-normal as the Autoguidance toy's sigma, x_t on the flow path, and the target: the exact velocity
    E[eps - x0 | x_t, y] (the null label's law: the equal mixture of the classes) or eps - x0 (target="noisy"). Every
    draw comes from a generator seeded with `seed`.
    -> dict of x_t (P, 2), t (P,), y (P,), velocity (P, 2), float32 and long"""
    generator = torch.Generator().manual_seed(seed)
    x0, y = training_batch(mixtures, size, generator)
    y = drop_labels(y, label_dropout, len(mixtures), generator)
    t = torch.sigmoid(LOGIT_T_MEAN + LOGIT_T_STD * torch.randn(size, generator=generator))
    eps = torch.randn(size, 2, generator=generator)
    x_t = FLOW.add_noise(x0, eps, t)
    if target == "exact":
        velocity = exact_velocity(list(mixtures) + [equal_mixture(mixtures)], x_t, t, y)  # indexed by label
    else:
        velocity = FLOW.v_target(x0, eps, t)
    return dict(x_t=x_t, t=t, y=y, velocity=velocity)


def train(model, pool, iterations, batch=1024, lr=1e-2, lr_decay_start=512, ema_std=0.010, aux_weight=0.5, seed=0,
          log=print, name="model"):
    """Adam (betas 0.9, 0.99) with lr / sqrt(max(i / lr_decay_start, 1)) and a power-function EMA of relative width
    `ema_std`, as the Autoguidance toy: the averaging profile's width is that fraction of the iterations so far, so
    the shorter-trained guide is its own last weights and never part initialisation. Each minibatch is `batch`
    consecutive points of `pool` (target_pool) from an offset drawn uniformly by a generator seeded with `seed` (the
    caller seeds the initialisation): the pool's points are independent draws, so a run of them is as random a
    minibatch as any subset, and a view costs nothing where gathering random rows took a fifth of the step.
    Returns the EMA copy."""
    generator = torch.Generator().manual_seed(seed)
    gamma = power_function_gamma(ema_std)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99), fused=True)  # fused: 15% faster a step
    start = time.time()
    for i in range(iterations):
        optimizer.param_groups[0]["lr"] = lr / max(i / lr_decay_start, 1) ** 0.5
        offset = int(torch.randint(len(pool["t"]) - batch + 1, (), generator=generator))
        x_t, t, y, velocity = (pool[key][offset:offset + batch] for key in ("x_t", "t", "y", "velocity"))
        loss = internal_guidance_loss(*model(x_t, t, y), velocity, aux_weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, power_function_decay(gamma, i + 1))
        if log and ((i + 1) % max(iterations // 4, 1) == 0 or i + 1 == iterations):
            elapsed = time.time() - start
            log(f"  {name}: iteration {i + 1}/{iterations}, loss {loss.item():.4f}, "
                f"{elapsed:.1f} s, ETA {elapsed / (i + 1) * (iterations - i - 1):.1f} s")
    return ema.eval()
