"""Noise schedules: DDPM (discrete, variance preserving) and the flow-matching linear interpolant.

Both families write the noisy sample the same way,

    x_t = alpha_t * x0 + sigma_t * eps,                         (forward noising)

so the conversions between the x0, eps and score parameterisations live once, in `Schedule`. They differ in the time
variable and in what they call "v":
  - DDPM (Ho et al. 2020): integer t in [0, T), alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), and the
    v-prediction of Salimans & Ho (2022), v = alpha_t * eps - sigma_t * x0.
  - Flow (the SiT / Internal Guidance release): t in [0, 1], t = 0 data, t = 1 noise, alpha_t = 1 - t, sigma_t = t,
    and the velocity v = d x_t / dt = eps - x0 that the network regresses.
"""
import math

import torch

PREDICTIONS = ("eps", "x0", "v")


def _broadcast(coef, like):
    """(N,) per-sample coefficients -> (N, 1, ..., 1) to broadcast against a (N, ...) tensor."""
    coef = torch.as_tensor(coef, dtype=like.dtype, device=like.device)
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


class Schedule:
    """x_t = alpha_t x0 + sigma_t eps; subclasses define alpha_sigma(t) and their v."""

    def alpha_sigma(self, t):
        raise NotImplementedError

    def _coefs(self, t, like):
        alpha, sigma = self.alpha_sigma(t)
        return _broadcast(alpha, like), _broadcast(sigma, like)

    def add_noise(self, x0, eps, t):
        alpha, sigma = self._coefs(t, x0)
        return alpha * x0 + sigma * eps

    def x0_from_eps(self, x_t, eps, t):
        alpha, sigma = self._coefs(t, x_t)
        return (x_t - sigma * eps) / alpha

    def eps_from_x0(self, x_t, x0, t):
        alpha, sigma = self._coefs(t, x_t)
        return (x_t - alpha * x0) / sigma

    def score_from_eps(self, eps, t):
        """grad_x log p_t(x) = -E[eps | x_t] / sigma_t (Tweedie)."""
        _, sigma = self._coefs(t, eps)
        return -eps / sigma

    def v_target(self, x0, eps, t):
        raise NotImplementedError

    def x0_eps_from_v(self, x_t, v, t):
        raise NotImplementedError

    def x0_eps(self, x_t, prediction, t, kind):
        """Any of the three parameterisations -> (x0, eps)."""
        if kind == "eps":
            return self.x0_from_eps(x_t, prediction, t), prediction
        if kind == "x0":
            return prediction, self.eps_from_x0(x_t, prediction, t)
        if kind == "v":
            return self.x0_eps_from_v(x_t, prediction, t)
        raise ValueError(f"prediction kind must be one of {PREDICTIONS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------------------------------
# DDPM
# ---------------------------------------------------------------------------------------------------------------------

def linear_betas(steps=1000, start=1e-4, end=0.02):
    """Ho et al. 2020: betas linear in t."""
    return torch.linspace(start, end, steps, dtype=torch.float64)


def scaled_linear_betas(steps=1000, start=0.00085, end=0.012):
    """Stable Diffusion 1.x: sqrt(beta) linear in t."""
    return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2


def cosine_betas(steps=1000, offset=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021: abar(t) = cos^2((t/T + s) / (1 + s) * pi / 2), betas clipped at max_beta."""
    s = torch.arange(steps + 1, dtype=torch.float64) / steps
    abar = torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


BETAS = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas}


class DDPMSchedule(Schedule):
    """Discrete VP schedule; t is an integer timestep (or a tensor of them) in [0, T)."""

    def __init__(self, betas):
        self.betas = torch.as_tensor(betas, dtype=torch.float64)  # (T,)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # abar_t, (T,)
        self.num_timesteps = len(self.betas)

    @classmethod
    def named(cls, name, steps=1000):
        if name not in BETAS:
            raise ValueError(f"unknown beta schedule {name!r}; choose one of {sorted(BETAS)}")
        return cls(BETAS[name](steps))

    def abar(self, t):
        t = torch.as_tensor(t, dtype=torch.long)
        return self.alphas_cumprod.to(t.device)[t]  # float64, on t's device

    def alpha_sigma(self, t):
        abar = self.abar(t)
        return abar.sqrt(), (1 - abar).sqrt()

    def respaced(self, kept):
        """The process on the `kept` timesteps only (ADM / DiT SpacedDiffusion): step k of the new schedule has
        beta'_k = 1 - abar_{kept[k]} / abar_{kept[k-1]} (abar before the first is 1), so abar'_k = abar_{kept[k]}.
        kept: ascending timesteps of this schedule. -> DDPMSchedule of len(kept) steps"""
        abar = self.alphas_cumprod[torch.as_tensor(kept, dtype=torch.long)]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        return DDPMSchedule(1 - abar / previous)

    def posterior_variance(self, t):
        """Variance of q(x_{t-1} | x_t, x0) (Ho et al. 2020, Eq. 7): beta_tilde_t = beta_t (1 - abar_{t-1}) /
        (1 - abar_t), for an integer t >= 1."""
        return self.betas[t] * (1 - self.abar(t - 1)) / (1 - self.abar(t))

    def learned_log_variance(self, values, t):
        """The learned variance of Nichol & Dhariwal 2021, Eq. 15, as ADM and DiT read it from the network's extra
        channels: log Sigma = frac log beta_t + (1 - frac) log beta_tilde_t with frac = (values + 1) / 2, values
        nominally in [-1, 1]; an integer t >= 1 (at t = 0 no noise is added)."""
        frac = (values + 1) / 2
        return frac * self.betas[t].log() + (1 - frac) * self.posterior_variance(t).log()

    def v_target(self, x0, eps, t):
        """Salimans & Ho 2022: v = alpha_t eps - sigma_t x0."""
        alpha, sigma = self._coefs(t, x0)
        return alpha * eps - sigma * x0

    def x0_eps_from_v(self, x_t, v, t):
        alpha, sigma = self._coefs(t, x_t)  # alpha^2 + sigma^2 = 1
        return alpha * x_t - sigma * v, sigma * x_t + alpha * v


# ---------------------------------------------------------------------------------------------------------------------
# Flow matching, linear interpolant
# ---------------------------------------------------------------------------------------------------------------------

class FlowSchedule(Schedule):
    """x_t = (1 - t) x0 + t eps with t in [0, 1]; t = 1 is pure noise."""

    def alpha_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return 1 - t, t

    def v_target(self, x0, eps, t):
        """Velocity d x_t / dt = eps - x0, the target of both IG heads."""
        return eps - x0

    def x0_eps_from_v(self, x_t, v, t):
        """x0 = x_t - t v and eps = x_t + (1 - t) v, both exact at every t in [0, 1]."""
        _, t = self._coefs(t, x_t)
        return x_t - t * v, x_t + (1 - t) * v

    def score_from_v(self, x_t, v, t):
        """score = -((1 - t) v + x_t) / t, the form the samplers use."""
        return self.score_from_eps(self.x0_eps_from_v(x_t, v, t)[1], t)
