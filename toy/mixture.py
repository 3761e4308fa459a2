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
    """sum_k phi_k N(mu_k, Sigma_k) in 2D, float64. Sigma_k = Q_k diag(lam_k) Q_k^T is kept eigendecomposed, so the
    noisy covariance C_k = Q_k diag((1 - t)^2 lam_k + t^2) Q_k^T and its inverse cost nothing to form at any t.
    Components come in groups of consecutive ones sharing one covariance (the fractal's 8 per branch; groups of 1 for
    any other mixture), so the per-covariance work is done once per group."""

    def __init__(self, phi, mu, sigma):
        phi = torch.as_tensor(np.asarray(phi), dtype=torch.float64)
        self.log_phi = (phi / phi.sum()).log()  # (K,)
        self.mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64)  # (K, 2)
        self.sigma = torch.as_tensor(np.asarray(sigma), dtype=torch.float64)  # (K, 2, 2)
        self.lam, self.q = torch.linalg.eigh(self.sigma)  # (K, 2), (K, 2, 2)
        runs = torch.unique_consecutive(self.sigma, dim=0, return_counts=True)[1]
        self.group_size = math.gcd(*runs.tolist())  # M: every run of equal covariances is a whole number of groups
        self.group_lam = self.lam[::self.group_size].contiguous()  # (G, 2)
        self.group_q = self.q[::self.group_size].contiguous()  # (G, 2, 2)
        grouped_mu = self.mu.view(len(self.group_q), self.group_size, 2)  # (G, M, 2)
        self.rotated_mu = torch.einsum("gji,gmj->gmi", self.group_q, grouped_mu)  # Q_g^T mu_k, (G, M, 2)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.log_phi.exp(), n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, 2, dtype=torch.float64, generator=generator)
        return self.mu[k] + torch.einsum("nij,nj->ni", self.q[k], self.lam[k].sqrt() * z)  # (n, 2)

    def _posterior(self, x, t):
        """Everything the exact quantities need, for all (sample, component) pairs at once, in x's dtype.
        x: (N, 2), t: (N,) ->
        r: (N, K) posterior component probabilities p(k | x_t),
        precision_y: (N, 2) sum_k r_k C_k^{-1} y_k,  sigma_precision_y: (N, 2) sum_k r_k Sigma_k C_k^{-1} y_k,
        log_p: (N,) log p_t(x), where y_k = x - (1 - t) mu_k. C_k shares Sigma_k's eigenvectors Q_k, so in the
        rotated coordinates z_k = Q_k^T y_k every matrix is diagonal: C_k^{-1} = Q_k diag(1 / lam_t) Q_k^T."""
        q, lam, rotated_mu, log_phi = (p.to(x.dtype) for p in (self.group_q, self.group_lam, self.rotated_mu,
                                                                  self.log_phi))
        n, (groups, size, _) = len(x), rotated_mu.shape
        a, t2 = (1 - t)[:, None, None], (t ** 2)[:, None, None]  # (N, 1, 1)
        inverse_lam_t = 1 / (a ** 2 * lam + t2)  # eigenvalues of C_g^{-1}, (N, G, 2)
        inverse_0, inverse_1 = inverse_lam_t[..., :1], inverse_lam_t[..., 1:]  # (N, G, 1) each
        rotated_x = (x @ q.permute(1, 0, 2).reshape(2, -1)).view(n, groups, 2)  # Q_g^T x, (N, G, 2)
        z0 = rotated_x[..., :1] - a * rotated_mu[..., 0]  # first rotated coordinate of y_k, (N, G, M)
        z1 = rotated_x[..., 1:] - a * rotated_mu[..., 1]
        log_w = (log_phi.view(groups, size) - 0.5 * (z0 * z0 * inverse_0 + z1 * z1 * inverse_1)
                 + 0.5 * (inverse_0 * inverse_1).log() - math.log(2 * math.pi))  # log phi_k N(x; (1 - t) mu_k, C_k)
        log_p = log_w.view(n, groups * size).logsumexp(-1)  # (N,)
        r = (log_w - log_p[:, None, None]).exp_()  # (N, G, M)
        precision_z = torch.stack([(r * z0).sum(-1), (r * z1).sum(-1)], -1) * inverse_lam_t  # (N, G, 2)
        precision_z = precision_z.reshape(n, 2 * groups)  # sum over each group of r_k Q_g^T C_g^{-1} y_k
        to_plane = q.mT.reshape(-1, 2)  # Q_g as a (G * 2, 2) map back from the rotated coordinates
        return r.reshape(n, groups * size), precision_z @ to_plane, (precision_z * lam.view(-1)) @ to_plane, log_p

    def _chunked(self, fn, x, t, pairs=1 << 17):
        """fn(x, t) -> tuple of tensors, applied to chunks of about `pairs` (sample, component) pairs.
        x: (N, 2) (a floating tensor keeps its dtype, anything else becomes float64), t: float or (N,)."""
        x = x if torch.is_tensor(x) and x.is_floating_point() else torch.as_tensor(x, dtype=torch.float64)
        t = torch.as_tensor(t, dtype=x.dtype).expand(len(x))
        size = max(pairs // len(self.mu), 1)
        parts = [fn(x_part, t_part) for x_part, t_part in zip(x.split(size), t.split(size))]
        return [torch.cat(p) for p in zip(*parts)]

    def log_prob(self, x, t=0.0):
        """log p_t(x). (N, 2) -> (N,)"""
        return self._chunked(lambda x, t: (self._posterior(x, t)[3],), x, t)[0]

    def score(self, x, t=0.0):
        """grad_x log p_t(x) = -sum_k r_k C_k^{-1} (x - (1 - t) mu_k). (N, 2) -> (N, 2)"""
        return self._chunked(lambda x, t: (-self._posterior(x, t)[1],), x, t)[0]

    def posterior_mean(self, x, t):
        """(E[x0 | x_t], E[eps | x_t]) from E[x0 | x_t, k] = mu_k + (1 - t) Sigma_k C_k^{-1} y_k and
        E[eps | x_t, k] = t C_k^{-1} y_k, y_k = x - (1 - t) mu_k. Exact at every t in [0, 1]. (N, 2) each."""
        def fn(x, t):
            r, precision_y, sigma_precision_y, _ = self._posterior(x, t)
            return r @ self.mu.to(x.dtype) + (1 - t)[:, None] * sigma_precision_y, t[:, None] * precision_y
        return tuple(self._chunked(fn, x, t))

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


def equal_mixture(mixtures):
    """The mixture that picks one of `mixtures` uniformly, then samples it (the law of x0 when the label is dropped)."""
    log_phi = torch.cat([m.log_phi for m in mixtures]) - math.log(len(mixtures))
    return GaussianMixture(log_phi.exp(), torch.cat([m.mu for m in mixtures]), torch.cat([m.sigma for m in mixtures]))
