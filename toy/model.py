"""The toy denoiser: an MLP with an Internal Guidance head after an early layer, predicting the flow velocity.

Sizes follow the Autoguidance toy (4 hidden layers of width 64 for the main model, width 32 for the guide). The class
label (with a null label for CFG) and the noise level enter at the input, so the early head sees them too.

Two parameterisations of each head's output (both heads use the same one):
- "energy" (the Autoguidance toy's): the head reads a log-density; its velocity is that of the Gaussian
  N(0, SIGMA_DATA^2) plus the gradient field of the learned term, so every output is the velocity of a density and IG
  extrapolates log-densities, log p_i + w (log p_f - log p_i), as autoguidance does with the guide's density.
- "velocity": the head is a linear map to the velocity (as the DiT's heads are).
"""
import torch
from torch import nn

SIGMA_DATA = 0.5  # expected standard deviation of the data, for the input scaling and the Gaussian base density


def noisy_variance(t):
    """s_t^2 = (1 - t)^2 SIGMA_DATA^2 + t^2: the variance of x_t for data of standard deviation SIGMA_DATA."""
    return (1 - t) ** 2 * SIGMA_DATA ** 2 + t ** 2


def gaussian_velocity(x, t):
    """Exact velocity E[eps - x0 | x_t] for data x0 ~ N(0, SIGMA_DATA^2 I): x_t is N(0, s_t^2 I),
    E[eps | x_t] = t x_t / s_t^2, E[x0 | x_t] = (1 - t) SIGMA_DATA^2 x_t / s_t^2. x: (N, 2), t: (N, 1) -> (N, 2)"""
    return x * (t - (1 - t) * SIGMA_DATA ** 2) / noisy_variance(t)


class EnergyHead(nn.Module):
    """Reads the log-density log p_t(x) = -|x|^2 / (2 s_t^2) + ((1 - t) / t) gain mean(proj(h)^2) (the Autoguidance
    toy's form; gain starts at 0, so the untrained head is the Gaussian base) and returns its velocity
    v = -(t grad log p + x) / (1 - t) = gaussian_velocity - grad_x (gain mean(proj(h)^2)): the (1 - t) / t = 1 / sigma
    scale cancels."""

    def __init__(self, hidden):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.gain = nn.Parameter(torch.zeros([]))

    def forward(self, h, x, t):
        """h: (N, H) features computed from x (which requires grad), x: (N, 2), t: (N, 1) -> (N, 2)"""
        energy = self.gain * self.proj(h).square().mean(1)  # (N,)
        grad, = torch.autograd.grad(energy.sum(), x, create_graph=self.training, retain_graph=True)
        return gaussian_velocity(x, t) - grad


class VelocityHead(nn.Module):
    """A linear map from the features to the velocity (h: (N, H) -> (N, 2); x and t unused)."""

    def __init__(self, hidden):
        super().__init__()
        self.proj = nn.Linear(hidden, 2)

    def forward(self, h, x, t):
        return self.proj(h)


HEADS = {"energy": EnergyHead, "velocity": VelocityHead}


class ToyDenoiser(nn.Module):
    def __init__(self, hidden=64, layers=4, intermediate_layer=1, num_classes=2, parameterisation="energy"):
        """Layer 0 maps (scaled x, noise level) + label embedding to the hidden width, layers 1..`layers` are hidden to
        hidden; the IG head reads the activations after layer `intermediate_layer` (None: no head)."""
        super().__init__()
        self.null_label = num_classes
        self.intermediate_layer = intermediate_layer
        self.label_embedding = nn.Embedding(num_classes + 1, hidden)
        self.layers = nn.ModuleList([nn.Linear(3, hidden)] + [nn.Linear(hidden, hidden) for _ in range(layers)])
        self.final_head = HEADS[parameterisation](hidden)
        self.intermediate_head = None if intermediate_layer is None else HEADS[parameterisation](hidden)

    def forward(self, x, t, y):
        """x: (N, 2) noisy points, t: (N,) flow times, y: (N,) labels -> (final, intermediate) velocities, (N, 2) each;
        intermediate is None for a model without the IG head. Differentiable in training mode (the energy heads' inner
        gradient keeps its graph), plain tensors in eval mode."""
        with torch.enable_grad():  # the energy heads differentiate in x, also inside a sampler's no_grad
            x = x if x.requires_grad else x.detach().requires_grad_()
            t = t[:, None].clamp(1e-5, 1 - 1e-5)
            x_in = x / noisy_variance(t).sqrt()  # unit variance at every t
            noise_level = torch.log(t / (1 - t)) / 4  # log sigma / 4, sigma = t / (1 - t) the EDM noise level
            h = torch.cat([x_in, noise_level], dim=1)  # (N, 3)
            intermediate = None
            for depth, layer in enumerate(self.layers):
                h = nn.functional.silu(layer(h) + (self.label_embedding(y) if depth == 0 else 0))  # (N, H)
                if depth == self.intermediate_layer:
                    intermediate = self.intermediate_head(h, x, t)
            final = self.final_head(h, x, t)
        if not self.training:
            final, intermediate = final.detach(), None if intermediate is None else intermediate.detach()
        return final, intermediate
