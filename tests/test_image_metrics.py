"""Image metrics: Frechet distance against closed forms, streaming moments, IS, SSIM / MS-SSIM against an independent
scipy computation, depth RMSE and mIoU on hand-made cases, and the FID Inception's layout, forward and weights."""
import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch
import torch.nn.functional as F

from ref.inception import WEIGHTS_ENV, WEIGHTS_URL, FIDInceptionV3, InceptionWeightsError, pool_3x3
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


def test_inception_score_on_confident_predictions():
    one_hot = 100.0 * np.eye(10)  # near one-hot p(y|x) after the softmax
    uniform_classes = np.tile(one_hot, (10, 1))  # every split holds each class once
    assert inception_score(uniform_classes, splits=10)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(np.tile(one_hot[:1], (100, 1)), splits=10)[0] == pytest.approx(1.0, rel=1e-6)
    # split 1: one class only (IS 1); split 2: ten classes (IS 10)
    mean, std = inception_score(np.concatenate([np.tile(one_hot[:1], (10, 1)), one_hot]), splits=2)
    assert (mean, std) == (pytest.approx(5.5, rel=1e-6), pytest.approx(4.5, rel=1e-6))
    with pytest.raises(ValueError, match="at least 10 samples"):
        inception_score(one_hot[:5], splits=10)


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


@pytest.fixture(scope="module")
def forwards(network):
    """Outputs at 299 and at another size, with what Mixed_6d's 1x1 branch gave (one forward each: they are slow)."""
    results = []
    for shape in [(1, 3, 299, 299), (2, 3, 64, 96)]:
        captured = {}
        hook = network.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.update(out=out))
        with torch.inference_mode():
            results.append((shape, network(torch.rand(shape)), captured["out"]))
        hook.remove()
    return results


def test_inception_forward_at_299_and_other_sizes(forwards):
    for shape, out, _ in forwards:
        assert {name: tuple(value.shape) for name, value in out.items()} == {
            "pool": (shape[0], 2048), "logits": (shape[0], 1008), "spatial": (shape[0], 2023)}
        assert all(torch.isfinite(value).all() for value in out.values())


def test_inception_spatial_features_are_mixed_6d_conv_in_tf_order(forwards):
    for shape, out, mixed_6d_conv in forwards:
        assert mixed_6d_conv.shape == (shape[0], 192, 17, 17)
        expected = mixed_6d_conv[:, :7].permute(0, 2, 3, 1).reshape(shape[0], -1)  # (H, W, C): ADM flattens NHWC
        torch.testing.assert_close(out["spatial"], expected, rtol=0, atol=0)


def test_inception_pools_follow_the_tf_graph(network):
    ones = torch.ones(1, 1, 5, 5)
    torch.testing.assert_close(pool_3x3(ones, "avg"), ones)  # zero padding excluded: 4/9 at corners otherwise
    average = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # noqa: E731
    maximum = lambda x: F.max_pool2d(x, 3, stride=1, padding=1)  # noqa: E731
    for block, channels, pooled in [(network.Mixed_7b, 1280, average), (network.Mixed_7c, 2048, maximum)]:
        x = torch.rand(1, channels, 8, 8)
        with torch.inference_mode():
            torch.testing.assert_close(block.branches(x)[3], block.branch_pool(pooled(x)), rtol=0, atol=0)


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


def test_inception_weight_errors_are_clear(network, weights_file, tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(InceptionWeightsError) as error:
        FIDInceptionV3()
    message = str(error.value)
    assert "--inception" in message and WEIGHTS_ENV in message
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "95.6 MB" in message and WEIGHTS_URL in message

    missing = tmp_path / "nowhere.pth"
    with pytest.raises(InceptionWeightsError, match="nowhere.pth: no such file"):
        FIDInceptionV3(missing)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights_file.read_bytes()[:1_000_000])
    with pytest.raises(InceptionWeightsError, match=r"truncated.pth \(1.0 MB\) could not be read") as error:
        FIDInceptionV3(truncated)
    assert "95.6 MB" in str(error.value) and WEIGHTS_URL in str(error.value)

    state = network.state_dict()
    state.pop("Mixed_6d.branch1x1.conv.weight")
    state["fc.weight"] = torch.zeros(1000, 2048)
    malformed = tmp_path / "malformed.pth"
    torch.save(state, malformed)
    with pytest.raises(InceptionWeightsError, match="not laid out as the public file") as error:
        FIDInceptionV3(malformed)
    assert "missing Mixed_6d.branch1x1.conv.weight" in str(error.value)
    assert "fc.weight: shape (1000, 2048), expected (1008, 2048)" in str(error.value)
