"""The toy denoiser: an MLP that predicts the flow velocity, with an Internal Guidance head after an early layer.

Sizes follow the Autoguidance toy (4 hidden layers of width 64 for the main model, width 32 for the guide). The class
label (with a null label for CFG) and the noise level enter at the input, so the early head sees them too.
"""
import torch
from torch import nn

SIGMA_DATA = 0.5  # expected standard deviation of the data, for the input scaling


class ToyDenoiser(nn.Module):
    def __init__(self, hidden=64, layers=4, intermediate_layer=1, num_classes=2):
        """Layer 0 maps (scaled x, noise level) + label embedding to the hidden width, layers 1..`layers` are hidden to
        hidden; the IG head reads the activations after layer `intermediate_layer` (None: no head)."""
        super().__init__()
        self.null_label = num_classes
        self.intermediate_layer = intermediate_layer
        self.label_embedding = nn.Embedding(num_classes + 1, hidden)
        self.layers = nn.ModuleList([nn.Linear(3, hidden)] + [nn.Linear(hidden, hidden) for _ in range(layers)])
        self.final_head = nn.Linear(hidden, 2)
        self.intermediate_head = None if intermediate_layer is None else nn.Linear(hidden, 2)

    def forward(self, x, t, y):
        """x: (N, 2) noisy points, t: (N,) flow times, y: (N,) labels -> (final, intermediate) velocities, (N, 2) each;
        intermediate is None for a model without the IG head."""
        t = t[:, None].clamp(1e-5, 1 - 1e-5)
        x_in = x / ((1 - t) ** 2 * SIGMA_DATA ** 2 + t ** 2).sqrt()  # unit variance at every t
        noise_level = torch.log(t / (1 - t)) / 4  # log sigma / 4, sigma = t / (1 - t) the EDM noise level
        h = torch.cat([x_in, noise_level], dim=1)  # (N, 3)
        intermediate = None
        for depth, layer in enumerate(self.layers):
            h = layer(h) + (self.label_embedding(y) if depth == 0 else 0)
            h = nn.functional.silu(h)  # (N, H)
            if depth == self.intermediate_layer:
                intermediate = self.intermediate_head(h)
        return self.final_head(h), intermediate
