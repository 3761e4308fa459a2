import numpy as np
import torch

import pytest

from ref.metrics import OutlierRate, inside_manifold, knn_radii, logp_outlier_rate, precision_recall


def test_knn_radii_is_the_distance_to_the_kth_other_point():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    assert torch.equal(knn_radii(points, k=1), torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64))
    assert torch.equal(knn_radii(points, k=2), torch.tensor([3.0, 2.0, 3.0, 6.0], dtype=torch.float64))


@pytest.mark.parametrize("dim", [2, 8])  # the k-d tree path (D <= 3) and the dense one
def test_knn_balls_match_brute_force(dim):
    g = torch.Generator().manual_seed(dim)
    centers, queries = torch.randn(300, dim, generator=g, dtype=torch.float64), 2 * torch.randn(500, dim, generator=g,
                                                                                             dtype=torch.float64)
    distances = ((centers[:, None] - centers[None]) ** 2).sum(-1).sqrt()  # (M, M), self at 0
    radii = distances.sort(dim=1).values[:, 3]
    assert torch.allclose(knn_radii(centers, k=3), radii, rtol=1e-12)
    to_queries = ((queries[:, None] - centers[None]) ** 2).sum(-1).sqrt()  # (N, M)
    expected = (to_queries <= radii).any(dim=1)
    assert 0.05 < expected.double().mean() < 0.95
    assert torch.equal(inside_manifold(queries, centers, radii), expected)


def test_precision_recall_identical_disjoint_and_collapsed():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(800, 2, generator=g, dtype=torch.float64)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    # a generator that covers only the left half: precision stays high, recall drops to about half
    collapsed = real[real[:, 0] < 0]
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.95 and 0.35 < recall < 0.65


def test_outlier_rate_counts_points_beyond_twice_the_99th_percentile():
    g = torch.Generator().manual_seed(1)
    reference, held_out = torch.rand(20000, 2, generator=g), torch.rand(5000, 2, generator=g)
    outliers = OutlierRate(reference, held_out)
    distances = outliers.nearest_distance(held_out)
    assert outliers.threshold == np.float64(2 * np.quantile(distances, 0.99))
    inside = torch.rand(1000, 2, generator=g)
    far = inside + 5.0
    assert outliers(inside) < 0.01 and outliers(far) == 1.0
    assert outliers(torch.cat([inside[:900], far[:100]])) >= 0.1


def test_logp_outlier_rate():
    logp_true = np.arange(1000.0)
    assert logp_outlier_rate(np.array([-1.0, 5.0, 50.0, 500.0]), logp_true) == 0.5  # threshold 9.99
