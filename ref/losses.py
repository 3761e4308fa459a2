"""Training objectives.

Internal Guidance (Zhou et al. 2026) trains an auxiliary head on an intermediate block on the same target as the final
output:  L = ||D_f - target||^2 + lambda * ||D_i - target||^2,  lambda = 0.5 in the release.
The target is the flow velocity eps - x0 (SiT / the IG release) or the DDPM noise eps (DiT). LightningDiT adds a
direction term on the final velocity, 1 - cos(D_f, v) (`cosine_distance`).
The InnerControl objectives (Eq. 5-8) are in ref/innercontrol.py.
"""
import torch
import torch.nn.functional as F

from ref.schedules import FlowSchedule

FLOW = FlowSchedule()


def mean_squared_error(prediction, target):
    """||prediction - target||^2 per sample, a mean over the non-batch dims. -> (N,)"""
    return (prediction - target).square().flatten(1).mean(1)


def internal_guidance_loss(final, intermediate, target, aux_weight=0.5):
    """Per-sample ||D_f - target||^2 + aux_weight ||D_i - target||^2. -> (N,)
    A model without an intermediate head (intermediate None) gets the plain objective."""
    loss = mean_squared_error(final, target)
    return loss if intermediate is None else loss + aux_weight * mean_squared_error(intermediate, target)


def cosine_distance(prediction, target):
    """LightningDiT's `use_cosine_loss` term (the IG release's transport.py): 1 - cos(prediction, target), the cosine
    over the channel dim at each position, a mean over the positions. (N, C, H, W) each -> (N,)"""
    return (1 - F.cosine_similarity(prediction, target, dim=1)).flatten(1).mean(1)


# t of the flow objective, one a sample, from a batch's per-sample draws (ref.runtime.SampleDraws) and the
# logit-normal's location m -> (N,)
FLOW_T_DISTRIBUTIONS = {
    "uniform": lambda draws, location: draws.rand(),  # U(0, 1): SiT / the IG release
    # sigmoid(n) with n ~ N(m, 1), the lognorm(m, 1) of SD3 (Esser et al. 2024; m = 0 their default): the training goes
    # to the middle of the path, where the content is decided, and little to its clean and pure-noise ends; m > 0
    # moves it towards the noise (t = 1)
    "logit-normal": lambda draws, location: torch.sigmoid(draws.randn() + location),
}


def check_t_draw(config):
    """A config's t draw (fields t_distribution, t_location) names one of FLOW_T_DISTRIBUTIONS, located if
    logit-normal."""
    if config["t_distribution"] not in FLOW_T_DISTRIBUTIONS:
        raise ValueError(f"unknown --t-distribution {config['t_distribution']!r}; choose "
                         f"{' or '.join(FLOW_T_DISTRIBUTIONS)}")
    if config["t_location"] and config["t_distribution"] != "logit-normal":
        raise ValueError("--t-location is the logit-normal's m: set --t-distribution logit-normal")


def flow_timesteps(draws, distribution="uniform", location=0.0):
    """t of the flow objective drawn from FLOW_T_DISTRIBUTIONS[distribution]; location: the logit-normal's m. -> (N,)"""
    if distribution not in FLOW_T_DISTRIBUTIONS:
        raise ValueError(f"unknown t distribution {distribution!r}; choose {' or '.join(FLOW_T_DISTRIBUTIONS)}")
    return FLOW_T_DISTRIBUTIONS[distribution](draws, location)


def ddpm_timesteps(draws, num_timesteps, distribution="uniform", location=0.0):
    """Integer t of the eps objective. uniform: t ~ U{0, ..., T - 1} (DDPM); logit-normal: the flow draw's u in (0, 1)
    binned onto the T steps, t = min(floor(T u), T - 1), so the training goes to the middle steps. -> (N,) int64"""
    if distribution == "uniform":
        return draws.randint(num_timesteps)
    return (flow_timesteps(draws, distribution, location) * num_timesteps).long().clamp(max=num_timesteps - 1)


def flow_matching_loss(model, x0, t, y, eps, aux_weight=0.5, cosine_loss=False):
    """Velocity regression on x_t = (1 - t) x0 + t eps with target v = eps - x0. model(x_t, t, y) -> (D_f, D_i).
    cosine_loss: plus cosine_distance(D_f, v), with weight 1 and on the final head only, as LightningDiT + IG's
    training adds it. -> (N,)"""
    final, intermediate = model(FLOW.add_noise(x0, eps, t), t, y)
    target = FLOW.v_target(x0, eps, t)
    loss = internal_guidance_loss(final, intermediate, target, aux_weight)
    return loss + cosine_distance(final, target) if cosine_loss else loss


def ddpm_eps_loss(model, schedule, x0, t, y, eps, aux_weight=0.5):
    """Noise regression (Ho et al. 2020, Eq. 14, the "simple" loss) on x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
    -> (N,)"""
    final, intermediate = model(schedule.add_noise(x0, eps, t), t, y)
    return internal_guidance_loss(final, intermediate, eps, aux_weight)


def drop_labels(y, probability, null_label, generator=None):
    """Label dropout for classifier-free guidance: each label becomes `null_label` with the given probability."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < probability
    return torch.where(drop, torch.full_like(y, null_label), y)


def drop_captions(tokens, empty, probability, draws):
    """Caption dropout for CFG: each caption (B, L) becomes the empty prompt's tokens `empty` (L,) with the given
    probability, drawn from the sample's own generator (draws: ref.runtime.SampleDraws)."""
    drop = draws.rand() < probability  # (B,), one draw from each sample's generator
    return torch.where(drop[:, None], empty.to(tokens), tokens)
