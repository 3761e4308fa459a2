"""Image metrics: Frechet distance against closed forms, streaming moments, IS, SSIM / MS-SSIM against an independent
scipy computation, depth RMSE and mIoU on hand-made cases, and the FID Inception's layout, forward and weights."""
import copy
import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch
import torch.nn.functional as F

from ref.inception import WEIGHTS_ENV, WEIGHTS_URL, FIDInceptionV3, InceptionWeightsError, resize_bilinear_tf1
from ref.metrics import (RunningMoments, SegmentationIoU, depth_rmse, frechet_distance, inception_score, ms_ssim,
                         ssim)


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """The Inception forwards dominate this file's time: give them both cores, then put the setting back."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def random_spd(dim, rng):
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# ---------------------------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------------------------

def test_frechet_distance_1d_closed_form():
    # N(1, 2^2) vs N(3, 3^2): (1 - 3)^2 + (2 - 3)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(5.0, abs=1e-12)


def test_frechet_distance_commuting_covariances():
    """Shared eigenvectors Q: sigma_i = Q diag(a_i) Q^T, so d^2 = |mu1 - mu2|^2 + sum_k (sqrt a1_k - sqrt a2_k)^2."""
    rng = np.random.default_rng(0)
    q = scipy.stats.ortho_group.rvs(6, random_state=1)
    a1, a2 = rng.uniform(0.2, 3.0, 6), rng.uniform(0.2, 3.0, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a1) - np.sqrt(a2)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a1) @ q.T, mu2, q @ np.diag(a2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_random_spd_matches_eigen_formula():
    """Tr (s1 s2)^(1/2) = Tr (s1^(1/2) s2 s1^(1/2))^(1/2), the latter from symmetric eigendecompositions only."""
    rng = np.random.default_rng(2)
    s1, s2 = random_spd(12, rng), random_spd(12, rng)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    values, vectors = np.linalg.eigh(s1)
    s1_root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    trace_root = np.sum(np.sqrt(np.linalg.eigvalsh(s1_root @ s2 @ s1_root)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_identical_singular_gaussians_is_zero():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((5, 20))  # 5 samples in 20 dimensions: covariance of rank 4
    mu, sigma = features.mean(axis=0), np.cov(features, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * np.trace(sigma)


def test_frechet_distance_rejects_imaginary_root_and_mismatched_shapes():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance([0.0, 0.0], np.diag([1.0, -1.0]), [0.0, 0.0], np.eye(2))  # sqrt(-1) on the diagonal
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---------------------------------------------------------------------------------------------------------------------
# Streaming moments, Inception Score
# ---------------------------------------------------------------------------------------------------------------------

def test_running_moments_equal_one_shot_statistics():
    features = np.random.default_rng(4).standard_normal((103, 7)).astype(np.float32) * 3 + 1
    moments = RunningMoments()
    for part in np.split(features, [1, 11, 50, 51]):
        moments.update(part)
    assert moments.count == 103
    np.testing.assert_allclose(moments.mean, features.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.cov, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10)


def test_running_moments_keep_precision_under_a_large_mean():
    """Sums of squares minus the squared mean would lose ~12 digits here; the pairwise update loses none."""
    rng = np.random.default_rng(5)
    spread = rng.standard_normal((400, 3))
    moments = RunningMoments()
    for part in np.split(1e6 + spread, 8):
        moments.update(part)
    np.testing.assert_allclose(moments.cov, np.cov(spread, rowvar=False), rtol=1e-8)


def kl(p, m):
    return sum(p_k * math.log(p_k / m_k) for p_k, m_k in zip(p, m))


def test_inception_score_on_hand_computed_softmax_rows():
    """Splits of 3 as the ADM evaluator cuts them: rows 0-2, 3-5, then row 6 alone. Logits log p (plus a per-row
    constant, which the softmax removes) give back the rows p."""
    rows = [(0.8, 0.2), (0.2, 0.8), (0.5, 0.5),  # marginal (0.5, 0.5)
            (0.5, 0.5), (0.5, 0.5), (0.5, 0.5),  # every row is the marginal: KL 0, IS 1
            (0.9, 0.1)]  # alone, it is its own marginal: IS 1
    logits = np.log(rows) + np.arange(7.0)[:, None]
    first = math.exp((kl(rows[0], (0.5, 0.5)) + kl(rows[1], (0.5, 0.5))) / 3)
    assert inception_score(logits, split_size=3) == pytest.approx((first + 1 + 1) / 3, rel=1e-12)
    # one split of all 7 rows: marginal (3.9 / 7, 3.1 / 7), another number
    whole = math.exp(sum(kl(row, (3.9 / 7, 3.1 / 7)) for row in rows) / 7)
    assert inception_score(logits, split_size=7) == pytest.approx(whole, rel=1e-12)
    assert abs(whole - (first + 2) / 3) > 0.05


def test_inception_score_splits_of_5000_with_a_shorter_last_one():
    """12,000 samples: 5000, 5000, 2000, as ADM's compute_inception_score; confident one-hot predictions give the
    number of classes each split holds: 4 classes, 2 classes, then 5 classes."""
    labels = np.concatenate([np.arange(5000) % 4, np.arange(5000) % 2, np.arange(2000) % 5])
    logits = 50.0 * np.eye(5)[labels]  # near one-hot p(y|x)
    assert inception_score(logits) == pytest.approx((4 + 2 + 5) / 3, rel=1e-6)
    assert inception_score(logits[:3]) == pytest.approx(3.0, rel=1e-6)  # under 5000 samples: one split


# ---------------------------------------------------------------------------------------------------------------------
# SSIM and MS-SSIM against an independent computation with scipy.ndimage
# ---------------------------------------------------------------------------------------------------------------------

def reference_ssim_terms(x, y, data_range):
    """numpy (H, W) pair -> (ssim, cs): Gaussian sigma 1.5 truncated at radius 5 (an 11-tap window), kept where the
    window lies inside the image."""
    def blur(a):
        return scipy.ndimage.gaussian_filter(a, sigma=1.5, truncate=3.5)[5:-5, 5:-5]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    return np.mean((2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs), np.mean(cs)


def reference_ms_ssim(x, y, data_range, weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)):
    value = 1.0
    for scale, weight in enumerate(weights):
        sim, cs = reference_ssim_terms(x, y, data_range)
        value *= max(sim if scale == len(weights) - 1 else cs, 0.0) ** weight
        h, w = x.shape[0] // 2, x.shape[1] // 2
        x, y = (a[:2 * h, :2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3)) for a in (x, y))
    return value


def correlated_pair(shape, seed, noise=0.3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator, dtype=torch.float64)
    smooth = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)  # some structure to share
    y = (smooth + noise * torch.rand(shape, generator=generator, dtype=torch.float64)).clamp(0, 1)
    return smooth, y


def test_ssim_of_an_image_with_itself_is_one():
    x = torch.rand(3, 2, 24, 30, dtype=torch.float64)
    torch.testing.assert_close(ssim(x, x, data_range=1.0), torch.ones(3, dtype=torch.float64))


def test_ssim_of_constant_images_closed_form():
    # no variance anywhere: SSIM is the luminance term (2 a b + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.7, 0.01 ** 2
    x, y = torch.full((1, 1, 16, 16), a, dtype=torch.float64), torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    assert float(ssim(x, y, data_range=1.0)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)


def test_ssim_matches_scipy_reference():
    x, y = correlated_pair((2, 3, 32, 40), seed=6)
    expected = [np.mean([reference_ssim_terms(x[n, c].numpy(), y[n, c].numpy(), 1.0)[0] for c in range(3)])
                for n in range(2)]
    got = ssim(x, y, data_range=1.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    assert 0.05 < got.min() and got.max() < 0.95  # a pair neither alike nor unrelated: the check has teeth
    # the constants follow data_range: the same images on a 0-255 scale give the same SSIM
    torch.testing.assert_close(ssim(255 * x, 255 * y, data_range=255.0), got)


def test_ms_ssim_is_one_on_itself_and_matches_scipy_reference():
    x, y = correlated_pair((2, 1, 180, 192), seed=7)
    torch.testing.assert_close(ms_ssim(x, x, data_range=1.0), torch.ones(2, dtype=torch.float64))
    expected = [reference_ms_ssim(x[n, 0].numpy(), y[n, 0].numpy(), 1.0) for n in range(2)]
    got = ms_ssim(x, y, data_range=1.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    assert not np.allclose(got.numpy(), ssim(x, y, data_range=1.0).numpy(), rtol=1e-3)  # the scales matter
    with pytest.raises(ValueError, match="at least 176"):
        ms_ssim(x[..., :170, :170], y[..., :170, :170], data_range=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Depth RMSE and mIoU on hand-made cases
# ---------------------------------------------------------------------------------------------------------------------

def test_depth_rmse_normalises_as_the_protocol():
    control = torch.tensor([[[0.0, 50.0, 100.0]]])  # min-max scaled: 0, 127.5, 255
    predicted = torch.tensor([[[1.0, 2.0, 4.0]]])  # max-normalised: 63.75, 127.5, 255
    expected = math.sqrt(63.75 ** 2 / 3)
    assert float(depth_rmse(predicted, control)) == pytest.approx(expected, rel=1e-12)
    # per image: a second, perfectly aligned pair (0-255 maps, already normalised) scores 0
    perfect = torch.tensor([[[0.0, 255.0, 51.0]]])
    torch.testing.assert_close(depth_rmse(torch.cat([predicted, perfect]), torch.cat([control, perfect])),
                               torch.tensor([expected, 0.0], dtype=torch.float64))


def test_ms_ssim_gives_torchmetrics_documented_value():
    """torchmetrics' MultiScaleStructuralSimilarityIndexMeasure docstring (the released edge metric, defaults: window
    11, sigma 1.5, its five betas, relu normalisation): rand (3, 3, 256, 256) of seed 42 against 0.75 x itself at data
    range 1 gives tensor(0.9627), the mean over the three images."""
    preds = torch.rand([3, 3, 256, 256], generator=torch.Generator().manual_seed(42))
    assert float(ms_ssim(preds.double(), 0.75 * preds.double(), data_range=1.0).mean()) == pytest.approx(0.9627,
                                                                                                      abs=5e-5)


def test_miou_with_ignore_label_and_absent_class():
    target = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
    predicted = torch.tensor([[[0, 1, 1], [1, 2, 2]]])
    iou = SegmentationIoU(num_classes=4)  # class 3 appears nowhere: left out of the mean
    iou.update(predicted, target)
    # class 0: I 1, U 2; class 1: I 2, U 3; class 2: I 1, U 1 (the pixel under the ignore label does not count)
    assert iou.miou == pytest.approx((1 / 2 + 2 / 3 + 1) / 3, rel=1e-12)


def test_miou_sums_over_the_set_before_dividing():
    iou = SegmentationIoU(num_classes=2)
    iou.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))  # alone: mIoU 1
    iou.update(torch.ones(1, 2, 2), torch.tensor([[[0, 0], [1, 1]]]))  # alone: (0 + 1/2) / 2
    # summed: class 0 I 4, U 6; class 1 I 2, U 4 (a mean of the per-batch values would give 0.625)
    assert iou.miou == pytest.approx((4 / 6 + 2 / 4) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="below num_classes"):
        iou.update(torch.full((1, 2, 2), 2), torch.zeros(1, 2, 2))


# ---------------------------------------------------------------------------------------------------------------------
# The FID Inception
# ---------------------------------------------------------------------------------------------------------------------

def conv(cin, cout, kh, kw=None):
    return (cout, cin, kh, kw or kh)  # a conv weight's shape


def block_a(cin, pool):
    return {"branch1x1": conv(cin, 64, 1), "branch5x5_1": conv(cin, 48, 1), "branch5x5_2": conv(48, 64, 5),
            "branch3x3dbl_1": conv(cin, 64, 1), "branch3x3dbl_2": conv(64, 96, 3), "branch3x3dbl_3": conv(96, 96, 3),
            "branch_pool": conv(cin, pool, 1)}


def block_c(c7):
    return {"branch1x1": conv(768, 192, 1), "branch7x7_1": conv(768, c7, 1), "branch7x7_2": conv(c7, c7, 1, 7),
            "branch7x7_3": conv(c7, 192, 7, 1), "branch7x7dbl_1": conv(768, c7, 1),
            "branch7x7dbl_2": conv(c7, c7, 7, 1), "branch7x7dbl_3": conv(c7, c7, 1, 7),
            "branch7x7dbl_4": conv(c7, c7, 7, 1), "branch7x7dbl_5": conv(c7, 192, 1, 7),
            "branch_pool": conv(768, 192, 1)}


def block_e(cin):
    return {"branch1x1": conv(cin, 320, 1), "branch3x3_1": conv(cin, 384, 1), "branch3x3_2a": conv(384, 384, 1, 3),
            "branch3x3_2b": conv(384, 384, 3, 1), "branch3x3dbl_1": conv(cin, 448, 1),
            "branch3x3dbl_2": conv(448, 384, 3), "branch3x3dbl_3a": conv(384, 384, 1, 3),
            "branch3x3dbl_3b": conv(384, 384, 3, 1), "branch_pool": conv(cin, 192, 1)}


def public_layout():
    """name -> shape of pt_inception-2015-12-05-6726825d.pth, from the port's architecture (torchvision Inception3
    with aux_logits=False, 1008 classes, FIDInceptionA/C/E blocks): 94 conv + BatchNorm units and the fc."""
    blocks = {"Mixed_5b": block_a(192, 32), "Mixed_5c": block_a(256, 64), "Mixed_5d": block_a(288, 64),
              "Mixed_6a": {"branch3x3": conv(288, 384, 3), "branch3x3dbl_1": conv(288, 64, 1),
                           "branch3x3dbl_2": conv(64, 96, 3), "branch3x3dbl_3": conv(96, 96, 3)},
              "Mixed_6b": block_c(128), "Mixed_6c": block_c(160), "Mixed_6d": block_c(160), "Mixed_6e": block_c(192),
              "Mixed_7a": {"branch3x3_1": conv(768, 192, 1), "branch3x3_2": conv(192, 320, 3),
                           "branch7x7x3_1": conv(768, 192, 1), "branch7x7x3_2": conv(192, 192, 1, 7),
                           "branch7x7x3_3": conv(192, 192, 7, 1), "branch7x7x3_4": conv(192, 192, 3)},
              "Mixed_7b": block_e(1280), "Mixed_7c": block_e(2048)}
    convs = {"Conv2d_1a_3x3": conv(3, 32, 3), "Conv2d_2a_3x3": conv(32, 32, 3), "Conv2d_2b_3x3": conv(32, 64, 3),
             "Conv2d_3b_1x1": conv(64, 80, 1), "Conv2d_4a_3x3": conv(80, 192, 3)}
    convs.update({f"{block}.{branch}": shape
                  for block, branches in blocks.items() for branch, shape in branches.items()})
    assert len(convs) == 94
    layout = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
    for name, shape in convs.items():
        layout[f"{name}.conv.weight"] = shape
        layout.update({f"{name}.bn.{stat}": shape[:1] for stat in ("weight", "bias", "running_mean", "running_var")})
    return layout


@pytest.fixture(scope="module")
def network():
    return FIDInceptionV3(random_weights=True)


@pytest.fixture(scope="module")
def weights_file(network, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(network.state_dict(), path)
    return path


def test_inception_layout_equals_the_public_file(network):
    state = {name: tuple(value.shape) for name, value in network.state_dict().items()
             if not name.endswith("num_batches_tracked")}
    assert state == public_layout()
    parameters = sum(p.numel() for p in network.parameters())
    assert parameters == sum(math.prod(shape) for name, shape in public_layout().items() if "running" not in name)
    assert 23.8e6 < parameters < 23.9e6  # 23,850,960


def mixed_6d_conv_code(n, c, h, w):
    """The value the forward below plants at Mixed_6d's 1x1 branch (TF's mixed_6/conv) for sample n, channel c,
    row h, column w: distinct integers scaled by 2^-16, exact in float32 and of an activation's size."""
    return (100_000 * n + 1000 * c + 20 * h + w) / 2 ** 16


@pytest.fixture(scope="module")
def forwards(network):
    """Outputs at 299 and at another size, one forward each (they are slow), with Mixed_6d's 1x1 branch replaced by
    `mixed_6d_conv_code` and Mixed_7c's output captured."""
    results = []
    for shape in [(1, 3, 299, 299), (2, 3, 64, 96)]:
        n, c, h, w = torch.meshgrid(*(torch.arange(size) for size in (shape[0], 192, 17, 17)), indexing="ij")
        code = mixed_6d_conv_code(n, c, h, w).float()  # (N, 192, 17, 17)
        captured = {}
        hooks = [network.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: code),
                 network.Mixed_7c.register_forward_hook(lambda module, args, out: captured.update(mixed_7c=out))]
        with torch.inference_mode():
            results.append((shape, network(torch.rand(shape)), captured["mixed_7c"]))
        for hook in hooks:
            hook.remove()
    return results


def test_inception_forward_at_299_and_other_sizes(forwards):
    for shape, out, _ in forwards:
        assert {name: tuple(value.shape) for name, value in out.items()} == {
            "pool": (shape[0], 2048), "logits": (shape[0], 1008), "spatial": (shape[0], 2023)}
        assert all(torch.isfinite(value).all() for value in out.values())


def test_inception_spatial_features_on_a_hand_case(forwards):
    """ADM: spatial = mixed_6/conv[..., :7] of the NHWC tensor, reshaped to (N, -1): feature (h 17 + w) 7 + c."""
    for shape, out, _ in forwards:
        for n in range(shape[0]):
            for k, (h, w, c) in {0: (0, 0, 0), 1: (0, 0, 1), 6: (0, 0, 6), 7: (0, 1, 0), 119: (1, 0, 0),
                                 2022: (16, 16, 6)}.items():
                assert out["spatial"][n, k] == mixed_6d_conv_code(n, c, h, w), (n, k)
            assert out["spatial"][n].max() == mixed_6d_conv_code(n, 6, 16, 16)  # channel 7 on is left out


def test_inception_pool_and_is_logits_from_mixed_7c(network, forwards):
    """pool_3 is the spatial mean of Mixed_7c; the IS logits multiply it by the fc weight without the bias."""
    assert network.fc.bias.abs().max() > 0.01  # a bias large enough to show if it were added
    for _, out, mixed_7c in forwards:
        pool = mixed_7c.double().mean(dim=(2, 3))
        torch.testing.assert_close(out["pool"].double(), pool, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["logits"].double(), pool @ network.fc.weight.double().T, rtol=0, atol=1e-3)


def conv_bn_relu(unit, x):
    """One conv + BatchNorm + ReLU unit from plain ops: 'SAME' padding from the kernel's shape (every unit of the
    blocks below has stride 1), BatchNorm's inference formula written out with TF's eps 0.001."""
    weight, bn = unit.conv.weight, unit.bn
    kernel_height, kernel_width = weight.shape[-2:]
    y = F.conv2d(x, weight, padding=(kernel_height // 2, kernel_width // 2))
    scale = bn.weight / torch.sqrt(bn.running_var + 0.001)
    return torch.relu((y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None])


def units(block, names, x):
    for name in names:
        x = conv_bn_relu(getattr(block, name), x)
    return x


def shifted_windows(x, fill):
    """The nine 3x3-neighbourhood shifts of x, padded with `fill`. (N, C, H, W) -> (9, N, C, H, W)"""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    return torch.stack([padded[..., i:i + height, j:j + width] for i in range(3) for j in range(3)])


def tf_same_average(x):
    """TF's 3x3 stride-1 'SAME' average: the sum over the window divided by the number of its in-image pixels."""
    return shifted_windows(x, 0.0).sum(dim=0) / shifted_windows(torch.ones_like(x), 0.0).sum(dim=0)


def randomised(block, seed):
    """A copy of the block whose BatchNorms hold random statistics and affine terms, so that they matter."""
    block, generator = copy.deepcopy(block), torch.Generator().manual_seed(seed)
    for bn in (module for module in block.modules() if isinstance(module, torch.nn.BatchNorm2d)):
        size = bn.num_features
        bn.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
        bn.running_var.copy_(0.5 + torch.rand(size, generator=generator))
        bn.weight.data.copy_(0.5 + torch.rand(size, generator=generator))
        bn.bias.data.copy_(0.1 * torch.randn(size, generator=generator))
    return block


def test_inception_blocks_equal_an_independent_computation(network):
    """Mixed_5b (A: 5x5, 'SAME' average pool), Mixed_6d (C: 1x7 / 7x1 pairs; sFID reads it) and Mixed_7c (E: split
    1x3 / 3x1 heads, max pool), recomputed with plain torch ops in the graph's branch order."""
    a, c, e = randomised(network.Mixed_5b, 0), randomised(network.Mixed_6d, 1), randomised(network.Mixed_7c, 2)
    generator = torch.Generator().manual_seed(3)
    x_a, x_c, x_e = (torch.rand(1, channels, size, size, generator=generator)
                     for channels, size in ((192, 12), (768, 9), (2048, 5)))  # any size: every unit is 'SAME'
    expected_a = torch.cat([conv_bn_relu(a.branch1x1, x_a), units(a, ["branch5x5_1", "branch5x5_2"], x_a),
                            units(a, ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], x_a),
                            conv_bn_relu(a.branch_pool, tf_same_average(x_a))], dim=1)  # (1, 256, 12, 12)
    expected_c = torch.cat([conv_bn_relu(c.branch1x1, x_c),
                            units(c, ["branch7x7_1", "branch7x7_2", "branch7x7_3"], x_c),
                            units(c, [f"branch7x7dbl_{i}" for i in range(1, 6)], x_c),
                            conv_bn_relu(c.branch_pool, tf_same_average(x_c))], dim=1)  # (1, 768, 9, 9)
    narrow, deep = conv_bn_relu(e.branch3x3_1, x_e), units(e, ["branch3x3dbl_1", "branch3x3dbl_2"], x_e)
    expected_e = torch.cat([conv_bn_relu(e.branch1x1, x_e),
                            conv_bn_relu(e.branch3x3_2a, narrow), conv_bn_relu(e.branch3x3_2b, narrow),
                            conv_bn_relu(e.branch3x3dbl_3a, deep), conv_bn_relu(e.branch3x3dbl_3b, deep),
                            conv_bn_relu(e.branch_pool, shifted_windows(x_e, -math.inf).amax(dim=0))], dim=1)
    with torch.inference_mode():
        for block, x, expected in ((a, x_a, expected_a), (c, x_c, expected_c), (e, x_e, expected_e)):
            got = block(x)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            assert expected.std() > 0.1 * expected.abs().mean()  # outputs that vary: the comparison has teeth


# ---------------------------------------------------------------------------------------------------------------------
# The input pipelines: TF1's legacy bilinear resize and (u - 128) / 128, or pytorch-fid's
# ---------------------------------------------------------------------------------------------------------------------

def additive_image(values):
    """image[y, x] = values[x] + 1000 values[y]: bilinear resizing acts on the two terms separately. (1, 1, n, n)"""
    values = torch.tensor(values)
    return (values[None, :] + 1000 * values[:, None])[None, None]


@pytest.mark.parametrize("values, tf1, half_pixel", [
    # 4 -> 3: TF1 reads 4 d / 3 = 0, 1.33, 2.67; PyTorch (d + 0.5) 4 / 3 - 0.5 = 0.17, 1.5, 2.83
    ([0.0, 10.0, 20.0, 40.0], [0.0, 10 + 10 / 3, 20 + 20 * 2 / 3], [10 / 6, 15.0, 20 + 20 * 5 / 6]),
    # 2 -> 5: TF1 reads 0, 0.4, 0.8, 1.2, 1.6, the last two clamped to pixel 1; PyTorch -0.3 (clamped to 0), 0.1, 0.5,
    # 0.9, 1.3 (clamped to 1)
    ([0.0, 10.0], [0.0, 4.0, 8.0, 10.0, 10.0], [0.0, 1.0, 5.0, 9.0, 10.0]),
])
def test_tf1_resize_reads_at_d_in_over_out(values, tf1, half_pixel):
    size = len(tf1)
    torch.testing.assert_close(resize_bilinear_tf1(additive_image(values), size), additive_image(tf1))
    pytorch = F.interpolate(additive_image(values), size=(size, size), mode="bilinear", align_corners=False)
    torch.testing.assert_close(pytorch, additive_image(half_pixel))


def reference_tf1_resize(image, size):
    """numpy float64 (H, W) -> (size, size): the bilinear weights written out, reading input (d in / out)."""
    def taps(in_size):
        position = np.arange(size) * in_size / size
        lower = np.floor(position).astype(int)
        return lower, np.minimum(lower + 1, in_size - 1), position - lower
    (y0, y1, wy), (x0, x1, wx) = taps(image.shape[0]), taps(image.shape[1])
    wy, wx = wy[:, None], wx[None, :]
    return ((1 - wy) * (1 - wx) * image[np.ix_(y0, x0)] + (1 - wy) * wx * image[np.ix_(y0, x1)]
            + wy * (1 - wx) * image[np.ix_(y1, x0)] + wy * wx * image[np.ix_(y1, x1)])


def test_tf1_resize_matches_the_weights_written_out():
    images = torch.rand(2, 3, 7, 10, generator=torch.Generator().manual_seed(8)) * 255
    for size in (13, 4, 7):  # up, down in both directions, and down in x only
        got = resize_bilinear_tf1(images, size)
        expected = np.stack([[reference_tf1_resize(channel, size) for channel in image]
                             for image in images.double().numpy()])
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-4)
    pixels = torch.randint(0, 256, (1, 3, 299, 299)).float()
    assert torch.equal(resize_bilinear_tf1(pixels, 299), pixels)  # same size: the pixels as they are


class FirstConvInput(Exception):
    pass


def first_conv_input(network, images):
    """What the Inception's first convolution receives; the forward stops there."""
    def stop(module, args):
        raise FirstConvInput(args[0])
    hook = network.Conv2d_1a_3x3.register_forward_pre_hook(stop)
    try:
        with pytest.raises(FirstConvInput) as stopped:
            network(images)
    finally:
        hook.remove()
    return stopped.value.args[0]


def test_inception_input_pipelines(network):
    generator = torch.Generator().manual_seed(9)
    pixels = torch.randint(0, 256, (2, 3, 299, 299), generator=generator)
    images = pixels.float() / 255  # as eval.py reads uint8 images
    assert network.resize == "tf1"  # the default
    assert torch.equal(first_conv_input(network, images), (pixels.float() - 128) / 128)  # the graph's Sub, Mul
    pytorch_fid = FIDInceptionV3(random_weights=True, resize="pytorch")
    torch.testing.assert_close(first_conv_input(pytorch_fid, images), (pixels.float() - 127.5) / 127.5)
    # at 64 x 96 the TF path resizes the 8-bit values themselves
    small = torch.randint(0, 256, (1, 3, 64, 96), generator=generator)
    tf_input = first_conv_input(network, small.float() / 255)
    expected = (np.stack([reference_tf1_resize(channel, 299) for channel in small[0].double().numpy()]) - 128) / 128
    np.testing.assert_allclose(tf_input[0].numpy(), expected, rtol=0, atol=1e-4)  # float32 positions, as in TF
    shift = (tf_input - first_conv_input(pytorch_fid, small.float() / 255)).abs().mean()
    assert shift > 0.01  # random pixels: the two resizes read far-apart values
    with pytest.raises(ValueError, match="tf1, pytorch"):
        FIDInceptionV3(random_weights=True, resize="bicubic")


def test_inception_loads_the_weight_file(network, weights_file, monkeypatch):
    from_argument = FIDInceptionV3(weights_file)
    monkeypatch.setenv(WEIGHTS_ENV, str(weights_file))
    for loaded in (from_argument, FIDInceptionV3()):
        for name, value in network.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value), name
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_inception_accepts_a_file_without_batch_counters(network, tmp_path):
    path = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    assert torch.equal(FIDInceptionV3(path).fc.weight, network.fc.weight)


def weights_error(path=None):
    """The one-line message FIDInceptionV3 refuses `path` with."""
    with pytest.raises(InceptionWeightsError) as error:
        FIDInceptionV3(path)
    message = str(error.value)
    assert "\n" not in message and "weights_only" not in message
    return message


def test_missing_inception_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    for message in (weights_error(), weights_error(tmp_path / "nowhere.pth")):
        assert "--inception" in message and WEIGHTS_ENV in message and WEIGHTS_URL in message
        assert "pt_inception-2015-12-05-6726825d.pth (about 95.6 MB" in message
    assert "nowhere.pth: no such file" in weights_error(tmp_path / "nowhere.pth")


def test_a_file_that_is_not_the_inception_weights_is_named_with_what_it_holds(network, weights_file, tmp_path):
    """No download advice here: the file exists; the message says what is in it and what --inception expects."""
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights_file.read_bytes()[:1_000_000])
    web_page = tmp_path / "page.pth"
    web_page.write_text("<html>Not Found</html>")
    foreign = tmp_path / "foreign.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3), "encoder.bias": torch.zeros(3), "step": 7}, foreign)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "ema": {"w": torch.zeros(2)}, "opt": {}, "args": {}}, checkpoint)
    a_tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), a_tensor)
    state = network.state_dict()
    state.pop("Mixed_6d.branch1x1.conv.weight")
    state["fc.weight"] = torch.zeros(1000, 2048)
    malformed = tmp_path / "malformed.pth"
    torch.save(state, malformed)
    expected = {truncated: "truncated.pth (1.0 MB) could not be read as a PyTorch state dict of tensors",
                web_page: "page.pth (0.0 MB) could not be read as a PyTorch state dict of tensors",
                foreign: "foreign.pth (0.0 MB) holds 3 entries (2 tensors; keys encoder.weight, encoder.bias, step), "
                         "none of the FID Inception's keys (expected e.g. Conv2d_1a_3x3.conv.weight)",
                checkpoint: "checkpoint.pt (0.0 MB) holds 4 entries (0 tensors; keys model, ema, opt, ...), none of",
                a_tensor: "tensor.pt (0.0 MB) holds a Tensor, not a state dict",
                malformed: "is not laid out as the public file: fc.weight: shape (1000, 2048), expected (1008, 2048); "
                           "missing Mixed_6d.branch1x1.conv.weight"}
    for path, found in expected.items():
        message = weights_error(path)
        assert message.startswith(str(path)) and found in message, message
        assert message.endswith("fc.weight, fc.bias)") and "--inception expects pt_inception-2015-12-05" in message
        assert WEIGHTS_URL not in message
