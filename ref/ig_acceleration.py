"""Internal Guidance's accelerated training (Zhou et al., arXiv 2512.24176; the paper's training speed-up, absent from
its release), an option off by default (on in the shapes testbed's shapes-one-object preset, omega = 0.5).

The EMA model, evaluated on the same x_t, gives its own IG direction D_f - D_i; the final head regresses the target
shifted along it, the intermediate head the plain target:

    L = ||D_f - (v + omega * sg(D_f^EMA - D_i^EMA))||^2 + lambda ||D_i - v||^2,     v = eps - x0 (flow time t = 1 noise)

sg = stop-gradient. The sign is IG's: sampling uses D_i + w (D_f - D_i) = D_f + (w - 1)(D_f - D_i), so one step of
the shift is IG's correction at w = 1 + omega on the EMA's current outputs. The shift feeds on itself, though: a final
head that meets its target while the EMA tracks it settles where D_f = u + omega (D_f - D_i), u = E[v | x_t] the
plain head's optimum, that is D_f = D_i + (u - D_i) / (1 - omega): IG of weight w = 1 / (1 - omega) on the plain
model's outputs (omega = 0.5: w = 2), and no fixed point for omega >= 1 (the shapes testbed's DiT at omega = 1 drew
blobs: docs/testbed.md). omega = 0 is the plain IG objective (ref.losses.internal_guidance_loss).
"""
import torch

from ref.losses import FLOW, cosine_distance, mean_squared_error


def accelerated_final_target(target, ema_final, ema_intermediate, omega):
    """v + omega * sg(D_f^EMA - D_i^EMA), the final head's target; all tensors of one shape."""
    return target + omega * (ema_final - ema_intermediate).detach()


def accelerated_flow_matching_loss(model, ema_model, x0, t, y, eps, omega, aux_weight=0.5, cosine_loss=False):
    """Per-sample accelerated IG loss on x_t = (1 - t) x0 + t eps. model, ema_model: (x_t, t, y) -> (D_f, D_i), both
    with the IG head; the EMA model runs without gradient. cosine_loss: plus LightningDiT's cosine_distance of the
    final head to its (shifted) target. -> (N,)"""
    x_t = FLOW.add_noise(x0, eps, t)
    target = FLOW.v_target(x0, eps, t)
    with torch.no_grad():
        ema_final, ema_intermediate = ema_model(x_t, t, y)
    final, intermediate = model(x_t, t, y)
    if intermediate is None or ema_intermediate is None:
        raise ValueError("accelerated IG training needs the intermediate head in both the model and its EMA")
    shifted = accelerated_final_target(target, ema_final, ema_intermediate, omega)
    loss = mean_squared_error(final, shifted) + aux_weight * mean_squared_error(intermediate, target)
    return loss + cosine_distance(final, shifted) if cosine_loss else loss
