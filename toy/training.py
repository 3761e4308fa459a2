"""Training the toy denoisers: flow matching on exact samples of the mixture, with the IG auxiliary loss, label dropout
for CFG, an Adam schedule and power-function EMA weights (the recipe of the Autoguidance toy, moved to the flow
schedule)."""
import copy
import time

import torch

from ref.ema import power_function_decay, power_function_gamma, update_ema
from ref.losses import drop_labels, flow_matching_loss

# Noise levels as in the Autoguidance toy: ln(sigma) ~ N(-2.3, 1.5^2) with sigma = t / (1 - t), i.e. logit(t) normal.
LOGIT_T_MEAN, LOGIT_T_STD = -2.3, 1.5


def training_batch(mixtures, batch, generator):
    """Labels uniform over the classes, x0 exact samples of each label's mixture. -> x0 (B, 2) float32, y (B,) long"""
    y = torch.randint(len(mixtures), (batch,), generator=generator)
    x0 = torch.zeros(batch, 2, dtype=torch.float64)
    for label, mixture in enumerate(mixtures):
        index = (y == label).nonzero().squeeze(1)
        x0[index] = mixture.sample(len(index), generator)
    return x0.float(), y


def train(model, mixtures, iterations, batch=2048, lr=1e-2, lr_decay_start=512, ema_std=0.010, label_dropout=0.1,
          aux_weight=0.5, seed=0, log=print, name="model"):
    """Adam (betas 0.9, 0.99) with lr / sqrt(max(i / lr_decay_start, 1)) and a power-function EMA of relative width
    `ema_std`, as the Autoguidance toy: the averaging profile's width is that fraction of the iterations so far, so
    the shorter-trained guide is its own last weights and never part initialisation. Every random draw of the loop
    comes from a generator seeded with `seed` (the caller seeds the initialisation). Returns the EMA copy."""
    generator = torch.Generator().manual_seed(seed)
    gamma = power_function_gamma(ema_std)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    start = time.time()
    for i in range(iterations):
        optimizer.param_groups[0]["lr"] = lr / max(i / lr_decay_start, 1) ** 0.5
        x0, y = training_batch(mixtures, batch, generator)
        y = drop_labels(y, label_dropout, model.null_label, generator)
        t = torch.sigmoid(LOGIT_T_MEAN + LOGIT_T_STD * torch.randn(batch, generator=generator))
        eps = torch.randn(batch, 2, generator=generator)
        loss = flow_matching_loss(model, x0, t, y, eps, aux_weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema, model, power_function_decay(gamma, i + 1))
        if log and ((i + 1) % max(iterations // 4, 1) == 0 or i + 1 == iterations):
            elapsed = time.time() - start
            log(f"  {name}: iteration {i + 1}/{iterations}, loss {loss.item():.4f}, "
                f"{elapsed:.1f} s, ETA {elapsed / (i + 1) * (iterations - i - 1):.1f} s")
    return ema.eval()
