"""Sample-quality metrics.

Distribution-level measures against a set of true samples (usable on 2D points or on feature vectors):
  - outlier rate: how many generated samples land far from every true sample;
  - k-NN precision / recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric", k = 3).
"""
import numpy as np
import scipy.spatial
import torch


# ---------------------------------------------------------------------------------------------------------------------
# Outliers
# ---------------------------------------------------------------------------------------------------------------------

class OutlierRate:
    """A sample is an outlier when its distance to the nearest reference sample exceeds `factor` times the `quantile`
    of that same distance for held-out true samples (factor 2, quantile 0.99: true samples of the toy score ~0.1%).

    Built on a k-d tree, so it is meant for low-dimensional points (the 2D toy)."""

    def __init__(self, reference, held_out, quantile=0.99, factor=2.0):
        self.tree = scipy.spatial.cKDTree(np.asarray(reference, dtype=np.float64))  # (M, D)
        held_out_distance = self.nearest_distance(held_out)
        self.threshold = float(factor * np.quantile(held_out_distance, quantile))

    def nearest_distance(self, points):
        return self.tree.query(np.asarray(points, dtype=np.float64), k=1)[0]  # (N,)

    def __call__(self, samples):
        return float(np.mean(self.nearest_distance(samples) > self.threshold))


def logp_outlier_rate(logp_samples, logp_true, quantile=0.01):
    """Fraction of samples whose true log-density is below the `quantile` of the log-density of true samples."""
    threshold = np.quantile(np.asarray(logp_true), quantile)
    return float(np.mean(np.asarray(logp_samples) < threshold))


# ---------------------------------------------------------------------------------------------------------------------
# k-NN precision and recall
# ---------------------------------------------------------------------------------------------------------------------

def knn_radii(points, k=3, chunk=4096):
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded). (N, D) -> (N,)"""
    points = torch.as_tensor(points)
    radii = [torch.cdist(part, points).kthvalue(k + 1, dim=1).values for part in points.split(chunk)]
    return torch.cat(radii)


def inside_manifold(queries, centers, radii, chunk=4096):
    """For each query, whether it lies in at least one ball (center_j, radius_j). (N, D), (M, D), (M,) -> (N,) bool"""
    queries, centers = torch.as_tensor(queries), torch.as_tensor(centers)
    inside = [(torch.cdist(part, centers) <= radii).any(dim=1) for part in queries.split(chunk)]
    return torch.cat(inside)


def precision_recall(real, fake, k=3):
    """Precision: fraction of fake samples inside the real manifold; recall: fraction of real samples inside the fake
    manifold, each manifold being the union of k-NN balls around its samples."""
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    precision = inside_manifold(fake, real, knn_radii(real, k)).double().mean()
    recall = inside_manifold(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)
