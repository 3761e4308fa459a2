"""The two-class fractal mixture of Gaussians of the Autoguidance toy (Karras et al. 2024), with exact noisy marginals.

Under the flow schedule x_t = (1 - t) x0 + t eps (ref/schedules.py), component k = N(mu_k, Sigma_k) becomes
N((1 - t) mu_k, C_k) with C_k = (1 - t)^2 Sigma_k + t^2 I, so the density, the score and the posterior means
E[x0 | x_t], E[eps | x_t] (hence the exact velocity) are known in closed form at every t.
"""
import math

import numpy as np
import torch

CLASSES = ("A", "B")


class GaussianMixture:
    """sum_k phi_k N(mu_k, Sigma_k) in 2D, float64. Sigma_k = Q_k diag(lam_k) Q_k^T is kept eigendecomposed, so the noisy
    covariance C_k = Q_k diag((1 - t)^2 lam_k + t^2) Q_k^T and its inverse cost nothing to form at any t."""

    def __init__(self, phi, mu, sigma):
        phi = torch.as_tensor(np.asarray(phi), dtype=torch.float64)
        self.log_phi = (phi / phi.sum()).log()  # (K,)
        self.mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64)  # (K, 2)
        self.lam, self.q = torch.linalg.eigh(torch.as_tensor(np.asarray(sigma), dtype=torch.float64))  # (K, 2), (K, 2, 2)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.log_phi.exp(), n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, 2, dtype=torch.float64, generator=generator)
        return self.mu[k] + torch.einsum("nij,nj->ni", self.q[k], self.lam[k].sqrt() * z)  # (n, 2)

    def _posterior(self, x, t):
        """Everything the exact quantities need at one flow time t (a float). x: (N, 2) ->
        r: (N, K) posterior component probabilities p(k | x_t),
        precision_y: (N, 2) sum_k r_k C_k^{-1} y_k,  sigma_precision_y: (N, 2) sum_k r_k Sigma_k C_k^{-1} y_k,
        log_p: (N,) log p_t(x), where y_k = x - (1 - t) mu_k."""
        a = 1 - t
        lam_t = a ** 2 * self.lam + t ** 2  # eigenvalues of C_k, (K, 2)
        precision = self.q @ torch.diag_embed(1 / lam_t) @ self.q.mT  # C_k^{-1}, (K, 2, 2)
        sigma_precision = self.q @ torch.diag_embed(self.lam / lam_t) @ self.q.mT  # Sigma_k C_k^{-1}, (K, 2, 2)
        d0, d1 = (x[:, None, :] - a * self.mu).unbind(-1)  # (N, K) each
        mahalanobis = precision[:, 0, 0] * d0 ** 2 + 2 * precision[:, 0, 1] * d0 * d1 + precision[:, 1, 1] * d1 ** 2
        log_w = self.log_phi - 0.5 * (mahalanobis + lam_t.log().sum(-1)) - math.log(2 * math.pi)  # (N, K)
        log_p = log_w.logsumexp(-1)
        r = (log_w - log_p[:, None]).exp()

        def weighted_apply(m):  # sum_k r_k M_k (x - a mu_k) through two (N, K) @ (K, .) products, (N, 2)
            mean_m = (r @ m.reshape(-1, 4)).reshape(-1, 2, 2)
            return torch.einsum("nij,nj->ni", mean_m, x) - a * r @ torch.einsum("kij,kj->ki", m, self.mu)

        return r, weighted_apply(precision), weighted_apply(sigma_precision), log_p

    def _at_each_t(self, fn, x, t, chunk=4096):
        """Apply fn(x, t_float) -> tensor or tuple of tensors over chunks of x and each distinct value of t."""
        x = torch.as_tensor(x, dtype=torch.float64)
        t = torch.as_tensor(t, dtype=torch.float64).expand(len(x))
        out = None
        for t_value in t.unique():
            index = (t == t_value).nonzero().squeeze(1)
            parts = [fn(x[i], float(t_value)) for i in index.split(chunk)]
            parts = [torch.cat(p) for p in zip(*parts)]
            if out is None:
                out = [torch.empty((len(x),) + p.shape[1:], dtype=p.dtype) for p in parts]
            for o, p in zip(out, parts):
                o[index] = p
        return out

    def log_prob(self, x, t=0.0):
        """log p_t(x). (N, 2) -> (N,)"""
        return self._at_each_t(lambda x, t: (self._posterior(x, t)[3],), x, t)[0]

    def score(self, x, t=0.0):
        """grad_x log p_t(x) = -sum_k r_k C_k^{-1} (x - (1 - t) mu_k). (N, 2) -> (N, 2)"""
        return self._at_each_t(lambda x, t: (-self._posterior(x, t)[1],), x, t)[0]

    def posterior_mean(self, x, t):
        """(E[x0 | x_t], E[eps | x_t]) from E[x0 | x_t, k] = mu_k + (1 - t) Sigma_k C_k^{-1} y_k and
        E[eps | x_t, k] = t C_k^{-1} y_k, y_k = x - (1 - t) mu_k. Exact at every t in [0, 1]. (N, 2) each."""
        def fn(x, t):
            r, precision_y, sigma_precision_y, _ = self._posterior(x, t)
            return r @ self.mu + (1 - t) * sigma_precision_y, t * precision_y
        return tuple(self._at_each_t(fn, x, t))

    def velocity(self, x, t):
        """Exact flow velocity E[eps - x0 | x_t]. (N, 2), t: float or (N,) -> (N, 2)"""
        x0, eps = self.posterior_mean(x, t)
        return eps - x0


# ---------------------------------------------------------------------------------------------------------------------
# The fractal construction (facts in shared/notes/internal-guidance.md, "The 2D toy")
# ---------------------------------------------------------------------------------------------------------------------

def fractal_mixture(classes="A", seed=2, origin=(0.0030, 0.0325), scale=(1.3136, 1.3844), depth_limit=7):
    """Mixture of the given classes ("A", "B" or "AB"): each class is a binary tree of 127 branches, each branch a row
    of 8 thin Gaussians. Both classes are always drawn (A first) so a class looks the same whichever is selected."""
    rng = np.random.RandomState(seed)
    origin, scale = np.asarray(origin), np.asarray(scale)
    components = []  # (class, phi, mu, Sigma)

    def branch(cls, depth, pos, angle):
        if depth >= depth_limit:
            return
        direction = np.array([np.cos(angle), np.sin(angle)])
        length = 0.292 * 0.8 ** depth * (1 + 0.2 * rng.randn())
        thickness = 0.2 * 0.8 ** depth / length
        size = scale * length * 0.06
        along = np.outer(direction, direction)
        sigma = (along + (np.eye(2) - along) * thickness ** 2) * np.outer(size, size)
        for tt in np.linspace(0.07, 0.93, 8):
            components.append((cls, length * 0.5 ** depth, (pos + direction * length * tt) * scale, sigma))
        for sign in (1, -1):
            branch(cls, depth + 1, pos + direction * length, angle + sign * 0.7 ** depth * (1 + 0.2 * rng.randn()))

    branch("A", 0, origin, np.pi / 4)
    branch("B", 0, origin, np.pi * 5 / 4)
    chosen = [c for c in components if c[0] in classes]
    return GaussianMixture(*(np.stack([c[i] for c in chosen]) for i in (1, 2, 3)))
