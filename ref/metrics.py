"""Sample-quality metrics.

Distribution-level measures against a set of true samples (usable on 2D points or on feature vectors):
  - outlier rate: how many generated samples land far from every true sample;
  - k-NN precision / recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric", k = 3).

Image metrics, compatible with the ADM evaluator (guided-diffusion `evaluations/evaluator.py`) on features of the FID
Inception (`ref/inception.py`):
  - streaming feature moments and the Frechet distance (FID on pool features, sFID on spatial features), the
    Inception Score, and precision / recall above; ADM-style .npz sample and reference batches;
  - control alignment (ControlNet++ / InnerControl protocol): SSIM and MS-SSIM, depth RMSE, mIoU.
"""
import contextlib
import dataclasses
import itertools
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.spatial
import torch
import torch.nn.functional as F
from PIL import Image

from ref.arguments import check_images
from ref.data import read_image


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

KD_TREE_MAX_DIM = 3  # up to this dimension (the 2D toy) k-d trees replace the dense distance matrices: same result


def knn_radii(points, k=3, chunk=4096):
    """Distance from each point to its k-th nearest neighbour in the same set (itself excluded). (N, D) -> (N,)"""
    points = torch.as_tensor(points)
    if points.shape[1] <= KD_TREE_MAX_DIM:
        as_numpy = points.double().numpy()
        return torch.from_numpy(scipy.spatial.cKDTree(as_numpy).query(as_numpy, k=k + 1)[0][:, -1])
    radii = [torch.cdist(part, points).topk(k + 1, dim=1, largest=False).values[:, -1] for part in points.split(chunk)]
    return torch.cat(radii)


def inside_manifold(queries, centers, radii, chunk=4096):
    """For each query, whether it lies in at least one ball (center_j, radius_j). (N, D), (M, D), (M,) -> (N,) bool"""
    queries, centers = torch.as_tensor(queries), torch.as_tensor(centers)
    if queries.shape[1] <= KD_TREE_MAX_DIM:  # each ball lists the queries it holds
        held = scipy.spatial.cKDTree(queries.double().numpy()).query_ball_point(
            centers.double().numpy(), torch.as_tensor(radii).double().numpy())
        inside = torch.zeros(len(queries), dtype=torch.bool)
        inside[list(itertools.chain.from_iterable(held))] = True
        return inside
    inside = [(torch.cdist(part, centers) <= radii).any(dim=1) for part in queries.split(chunk)]
    return torch.cat(inside)


def precision_recall(real, fake, k=3):
    """Precision: fraction of fake samples inside the real manifold; recall: fraction of real samples inside the fake
    manifold, each manifold being the union of k-NN balls around its samples."""
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    precision = inside_manifold(fake, real, knn_radii(real, k)).double().mean()
    recall = inside_manifold(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------------------------------
# Gaussian statistics of features and the Frechet distance (FID, sFID)
# ---------------------------------------------------------------------------------------------------------------------

class RunningMoments:
    """Mean and covariance of feature vectors given in batches, accumulated in float64, so that a 50K-sample set never
    sits in memory. Batches merge by the pairwise update of Chan, Golub & LeVeque (1979), which keeps full precision
    even when the mean is large against the spread:
        n = n_a + n_b,   delta = mean_b - mean_a,
        mean = mean_a + delta n_b / n,   M2 = M2_a + M2_b + delta delta^T n_a n_b / n,
    with M2 the sum of outer products of deviations from the mean; cov = M2 / (n - 1), the unbiased estimate of
    np.cov(rowvar=False) that the ADM evaluator uses."""

    def __init__(self):
        self.count = 0
        self.mean = None  # (D,)
        self.m2 = None  # (D, D)

    def update(self, features):
        batch = np.asarray(features, dtype=np.float64).reshape(len(features), -1)  # (B, D)
        batch_mean = batch.mean(axis=0)
        centered = batch - batch_mean
        self.merge(len(batch), batch_mean, centered.T @ centered)

    def merge(self, count, mean, m2):
        """Add a set of `count` vectors summarised by its mean (D,) and M2 (D, D): a batch, or another RunningMoments
        (another rank's share: `merge(other.count, other.mean, other.m2)`)."""
        if count == 0:
            return
        if self.count == 0:
            self.mean, self.m2 = np.zeros(len(mean)), np.zeros((len(mean),) * 2)
        total = self.count + count
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.count * count / total)
        self.mean = self.mean + delta * (count / total)
        self.count = total

    @property
    def cov(self):
        return self.m2 / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982),
    the FID of Heusel et al. (2017):

        d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    Computed as the reference code (TTUR fid.py, the ADM evaluator) does, so that numbers agree: scipy's sqrtm of the
    product; when the product is too near singular for a finite root, eps I is added to both covariances; a root whose
    diagonal has an imaginary part above 1e-3 is an error, smaller imaginary parts are rounding and dropped."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        warnings.warn(f"Frechet distance: singular product of covariances; adding {eps} to their diagonals")
        offset = eps * np.eye(len(sigma1))
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: sqrtm has an imaginary component {np.max(np.abs(root.imag)):.3g}")
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


# ---------------------------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------------------------

INCEPTION_SCORE_SPLIT_SIZE = 5000  # ADM evaluator: compute_inception_score(activations, split_size=5000)


def inception_score(logits, split_size=INCEPTION_SCORE_SPLIT_SIZE):
    """Salimans et al. (2016): IS = exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over a split, averaged over
    splits as the ADM evaluator cuts them: consecutive runs of `split_size` samples, the last one possibly shorter
    (50K samples: 10 splits of 5000; 12K: 5000, 5000, 2000). Softmax and logarithms in float64 (ADM: float32).
    (N, K) logits -> IS"""
    log_probs = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)  # (N, K)
    scores = []
    for part in log_probs.split(split_size):
        log_marginal = part.exp().mean(dim=0).log()  # (K,)
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp())
    return float(torch.stack(scores).mean())


# ---------------------------------------------------------------------------------------------------------------------
# Image sets on disk: ADM-style .npz batches and folders
# ---------------------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@contextlib.contextmanager
def npy_in_npz(path, name):
    """Open the member `name`.npy of an .npz archive positioned at its data -> (file, shape, dtype)."""
    with zipfile.ZipFile(path) as archive:
        if f"{name}.npy" not in archive.namelist():
            raise ValueError(f"{path}: no {name} in the archive (has {', '.join(archive.namelist())})")
        with archive.open(f"{name}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f"{path}: {name}.npy has .npy format version {version}; 1.0 or 2.0 expected")
            shape, fortran_order, dtype = read_header[version](member)
            if fortran_order:
                raise ValueError(f"{path}: {name} is stored in Fortran order; C order expected")
            yield member, shape, dtype


def to_mode(image, mode):
    """(H, W[, C]) array -> the same image in PIL `mode` ("RGB", "L"); None keeps it as stored (label maps)."""
    if mode is None:
        return image
    image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    return np.asarray(Image.fromarray(image).convert(mode))


class ImageSource:
    """Equally sized images read in batches from an ADM-style .npz (`arr_0`, (N, H, W[, C]) uint8, streamed from the
    archive so that it never sits in memory whole; `arr_1`, the labels, is not needed) or from a folder of image files
    taken in name order. Every image is converted to `mode` (a PIL mode), or kept as stored when mode is None."""

    def __init__(self, path, mode=None):
        self.path, self.mode = Path(path), mode
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            self.count = len(self.files)
        elif not zipfile.is_zipfile(self.path):
            raise ValueError(f"{path}: {'not an .npz archive' if self.path.exists() else 'no such file or folder'}; "
                             f"expected a folder of equally sized images or an ADM-style .npz (arr_0)")
        else:
            with npy_in_npz(self.path, "arr_0") as (_, shape, dtype):
                self.count = shape[0]
            if mode is not None:  # images, not label maps: the documented layout, before any of them is read
                check_images(shape, dtype, f"{self.path}: arr_0")
        if self.count == 0:
            raise ValueError(f"{path}: no images")

    def __len__(self):
        return self.count

    def batches(self, batch_size):
        """Yield (B, H, W[, C]) arrays in order."""
        if self.path.is_dir():
            for start in range(0, self.count, batch_size):
                yield self.stack([np.asarray(read_image(f, mode=None)) for f in self.files[start:start + batch_size]])
            return
        with npy_in_npz(self.path, "arr_0") as (member, shape, dtype):
            image_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, self.count, batch_size):
                size = min(batch_size, self.count - start)
                data = member.read(size * image_bytes)
                if len(data) != size * image_bytes:
                    raise ValueError(f"{self.path}: arr_0 ends after {start + len(data) // image_bytes} of "
                                     f"{self.count} images")
                yield self.stack(np.frombuffer(data, dtype=dtype).reshape(size, *shape[1:]))

    def stack(self, images):
        images = [to_mode(image, self.mode) for image in images]
        if len({image.shape for image in images}) > 1:
            raise ValueError(f"{self.path}: images of different sizes {sorted({image.shape for image in images})}")
        return np.stack(images)


# ---------------------------------------------------------------------------------------------------------------------
# FID, sFID, IS, precision/recall of image sets (the ADM evaluator's numbers)
# ---------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FeatureSummary:
    """What the ADM metrics need from one image set: (mu, sigma) of the pool features and of the sFID spatial
    features, and, kept whole as the ADM evaluator keeps them, the pool features (N, 2048) for precision/recall and
    the logits (N, 1008) for IS. A reference read from stored statistics alone has only the moments."""
    count: int
    pool_moments: tuple = None
    spatial_moments: tuple = None
    pool: np.ndarray = None
    logits: np.ndarray = None


class ImageFeatures:
    """The features of an image set taken a batch at a time, as FeatureSummary needs them: running moments of the pool
    (and, when the extractor gives them, spatial) features, and the pool features and logits kept whole with each
    image's index, so that shares taken apart (the ranks of a sampling run, each its samples r, r + W, ...) merge into
    the summary of the whole set in index order (the IS splits follow that order)."""

    def __init__(self, extractor, device="cpu"):
        self.extractor, self.device = extractor, device
        self.pool_moments, self.spatial_moments = RunningMoments(), RunningMoments()
        self.indices, self.pool, self.logits = [], [], []
        self.seconds = 0.0  # spent in update: the extractor and the moments

    @property
    def count(self):
        return self.pool_moments.count

    def update(self, images, indices=None):
        """RGB uint8 images (B, H, W, 3) of the set's `indices` (default: the next B)."""
        start = time.perf_counter()
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        with torch.inference_mode():  # x: (B, 3, H, W) in [0, 1]
            features = {name: value.float().cpu().numpy() for name, value in self.extractor(x).items()}
        self.indices.append(np.arange(self.count, self.count + len(images)) if indices is None else np.asarray(indices))
        self.pool_moments.update(features["pool"])
        if "spatial" in features:
            self.spatial_moments.update(features["spatial"])
        self.pool.append(features["pool"])
        self.logits.append(features["logits"])
        self.seconds += time.perf_counter() - start  # the features came back to the CPU: the device is done

    def share(self):
        """What another process needs to merge this one in (no extractor): (indices, moments, pool, logits)."""
        return (np.concatenate(self.indices or [np.zeros(0, np.int64)]), self.pool_moments, self.spatial_moments,
                self.pool, self.logits)


def merged_summary(shares):
    """ImageFeatures.share() of every part of one image set -> its FeatureSummary: the moments merged (Chan et al.),
    the pool features and logits in index order."""
    pool_moments, spatial_moments = RunningMoments(), RunningMoments()
    for _, pool_part, spatial_part, _, _ in shares:
        pool_moments.merge(pool_part.count, pool_part.mean, pool_part.m2)
        spatial_moments.merge(spatial_part.count, spatial_part.mean, spatial_part.m2)
    order = np.argsort(np.concatenate([share[0] for share in shares]), kind="stable")
    pool = np.concatenate([part for share in shares for part in share[3]])[order]
    logits = np.concatenate([part for share in shares for part in share[4]])[order]
    spatial = (spatial_moments.mean, spatial_moments.cov) if spatial_moments.count else None
    return FeatureSummary(pool_moments.count, (pool_moments.mean, pool_moments.cov), spatial, pool, logits)


def summarise_images(images, extractor, batch_size=50, device="cpu", on_batch=None):
    """Run the feature extractor (FIDInceptionV3 or anything returning the same "pool", "logits" and, optionally,
    "spatial") over an ImageSource of RGB uint8 images; the spatial features only feed running moments (None without
    them). on_batch(done, total) reports."""
    features = ImageFeatures(extractor, device)
    for batch in images.batches(batch_size):
        features.update(batch)
        if on_batch:
            on_batch(features.count, len(images))
    return merged_summary([features.share()])


REFERENCE_KEYS = {"pool_moments": ("mu", "sigma"), "spatial_moments": ("mu_s", "sigma_s")}  # the ADM names
RESIZE_KEY = "inception_resize"  # which Inception input pipeline made a reference's moments (ours only)


def recorded_pipeline(path, flag="--ref"):
    """What an ADM reference batch says of its features: (the Inception input pipeline a --write-ref recorded, or
    None; whether it stores mu/sigma). A missing path, a folder or a file that is no .npz archive raises, naming
    `flag`."""
    expected = "expected an ADM reference batch (.npz; eval.py fid --write-ref writes one)"
    if Path(path).is_dir():
        raise ValueError(f"{flag} {path}: a folder; {expected}, from a folder of images too: eval.py fid --samples "
                         f"FOLDER --write-ref REF.npz")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{flag} {path}: {'not an .npz archive' if Path(path).exists() else 'no such file'}; "
                         f"{expected}")
    with np.load(path) as archive:
        return (str(archive[RESIZE_KEY]) if RESIZE_KEY in archive.files else None), "mu" in archive.files


def save_reference(path, images, summary, resize, batch_size=100):
    """Write an ADM-style reference batch: arr_0, the images (copied a batch at a time), the moments as
    mu, sigma, mu_s, sigma_s, and `resize` (the Inception input pipeline behind them) as inception_resize, which the
    ADM evaluator ignores. Same layout as np.savez, one .npy per array in a zip archive."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    batches = images.batches(batch_size)
    first = next(batches)
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
              "shape": (len(images),) + first.shape[1:]}
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, header)
            for batch in itertools.chain([first], batches):
                member.write(np.ascontiguousarray(batch).tobytes())
        for field, names in REFERENCE_KEYS.items():
            for name, array in zip(names, getattr(summary, field)):
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(array))
        with archive.open(f"{RESIZE_KEY}.npy", "w") as member:
            np.lib.format.write_array(member, np.asarray(resize))


def reference_contents(path):
    """An ADM reference batch's stored arrays but its images, and whether it has images (arr_0); one with neither
    images nor mu/sigma raises. -> ({name: array}, bool)"""
    with np.load(path) as archive:
        stored = {name: archive[name] for name in archive.files if name != "arr_0"}
        has_images = "arr_0" in archive.files
    if not has_images and "mu" not in stored:
        raise ValueError(f"{path}: a reference needs images (arr_0) or statistics (mu, sigma); it has {sorted(stored)}")
    return stored, has_images


def load_reference(path, extractor, batch_size=50, device="cpu", on_batch=None):
    """An ADM reference batch -> FeatureSummary. Stored mu/sigma (mu_s/sigma_s) are used when present, as the ADM
    evaluator does; the images in arr_0, when present, are run through the extractor (precision/recall need their
    features, and the moments come from them when none are stored)."""
    stored, has_images = reference_contents(path)
    summary = (summarise_images(ImageSource(path, "RGB"), extractor, batch_size, device, on_batch) if has_images
               else FeatureSummary(count=None))
    for field, names in REFERENCE_KEYS.items():
        if all(name in stored for name in names):
            setattr(summary, field, tuple(stored[name] for name in names))
    return summary


def fid_report(samples, reference=None):
    """IS of the samples (the ADM split rule); with a reference: FID, sFID (when the reference has spatial moments)
    and precision/recall (k = 3, when the reference has images). None marks what cannot be computed."""
    report = {"samples": samples.count, "inception_score": inception_score(samples.logits)}
    if reference is None:
        return report
    report["reference"] = reference.count
    report["fid"] = frechet_distance(*samples.pool_moments, *reference.pool_moments)
    report["sfid"] = (frechet_distance(*samples.spatial_moments, *reference.spatial_moments)
                      if reference.spatial_moments is not None else None)
    report["precision"], report["recall"] = (precision_recall(reference.pool, samples.pool)
                                             if reference.pool is not None else (None, None))
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Control alignment: SSIM / MS-SSIM (edges), RMSE (depth), mIoU (segmentation)
# ---------------------------------------------------------------------------------------------------------------------

SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004, Sec. III-C
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang, Simoncelli & Bovik 2003, Sec. 3.1, fine to coarse


def gaussian_window(size=11, sigma=1.5, dtype=torch.float64):
    """Normalised 1-D Gaussian taps centred on the middle one. (size,)"""
    offsets = torch.arange(size, dtype=dtype) - (size - 1) / 2
    taps = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    return taps / taps.sum()


def gaussian_blur_valid(x, window):
    """Separable Gaussian filter of each channel, over the 'valid' region only (no padding), as the SSIM reference
    code filters. (N, C, H, W) -> (N, C, H - s + 1, W - s + 1)"""
    channels, taps = x.shape[1], window.to(x.dtype)
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def ssim_terms(x, y, data_range, window):
    """SSIM of Wang et al. (2004), Eq. 13, from Gaussian-weighted local means, variances and covariance:

        ssim = (2 mu_x mu_y + C1) (2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (s_x^2 + s_y^2 + C2)),
        cs   = (2 s_xy + C2) / (s_x^2 + s_y^2 + C2),     C1 = (K1 L)^2, C2 = (K2 L)^2, L = data_range,

    cs being the contrast-structure factor MS-SSIM takes at the finer scales. Each is averaged over channels and
    positions per image. (N, C, H, W) x 2 -> (N,), (N,)"""
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    blurred = gaussian_blur_valid(torch.cat([x, y, x * x, y * y, x * y]), window)  # (5N, C, H', W')
    mu_x, mu_y, xx, yy, xy = blurred.split(len(x))
    var_x, var_y, cov_xy = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
    cs = (2 * cov_xy + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs
    return ssim_map.flatten(1).mean(dim=1), cs.flatten(1).mean(dim=1)


def ssim(x, y, data_range, window_size=11, sigma=1.5):
    """Per-image SSIM, Gaussian window 11, sigma 1.5. (N, C, H, W) x 2 -> (N,)"""
    return ssim_terms(x, y, data_range, gaussian_window(window_size, sigma))[0]


def ms_ssim(x, y, data_range, window_size=11, sigma=1.5, weights=MS_SSIM_WEIGHTS):
    """Per-image multi-scale SSIM (Wang, Simoncelli & Bovik 2003, Eq. 7, one exponent per scale):

        MS-SSIM = ssim_M^w_M  prod_{j < M} cs_j^w_j,

    scale j + 1 being scale j average-pooled 2 x 2. Negative terms are clamped to 0 before the powers, as in
    torchmetrics and pytorch-msssim (ControlNet++ reports torchmetrics' MS-SSIM). (N, C, H, W) x 2 -> (N,)"""
    coarsest = min(x.shape[-2:]) // 2 ** (len(weights) - 1)
    if coarsest < window_size:
        raise ValueError(f"MS-SSIM over {len(weights)} scales with window {window_size} needs images of at least "
                         f"{window_size * 2 ** (len(weights) - 1)} pixels a side, got {tuple(x.shape[-2:])}")
    window, factors = gaussian_window(window_size, sigma), []
    for weight in weights[:-1]:
        factors.append(ssim_terms(x, y, data_range, window)[1].clamp(min=0) ** weight)
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    factors.append(ssim_terms(x, y, data_range, window)[0].clamp(min=0) ** weights[-1])
    return torch.stack(factors).prod(dim=0)


def depth_rmse(predicted, control):
    """Per-image depth RMSE on the 0-255 scale of the ControlNet++ / InnerControl protocol: the input control depth
    min-max scaled to [0, 255], the evaluation model's depth of the generated image divided by its maximum and
    scaled by 255 (ControlNet++ eval/evaluate.py), then sqrt of the mean squared difference (eval/eval_depth.py); the
    protocol averages it over images. Maps already saved by that pipeline are (nearly) unchanged by the two
    scalings. A constant control maps to 0. (N, H, W) x 2 -> (N,)"""
    predicted, control = predicted.double().flatten(1), control.double().flatten(1)  # (N, HW)
    low, high = control.min(dim=1, keepdim=True).values, control.max(dim=1, keepdim=True).values
    control = (control - low) / (high - low).clamp(min=1e-12) * 255
    predicted = predicted / predicted.max(dim=1, keepdim=True).values.clamp(min=1e-12) * 255
    return ((predicted - control) ** 2).mean(dim=1).sqrt()


class SegmentationIoU:
    """Per-class intersection and union summed over a whole set, as mmsegmentation's IoUMetric (the segmentation
    metric of the ControlNet++ / InnerControl evaluation; mmseg/evaluation/metrics/iou_metric.py, `compute_metrics`
    and `total_area_to_metrics`): IoU_c = sum I_c / sum U_c, mIoU = the mean over classes whose union is not empty
    (mmseg's 0 / 0 = NaN of a class absent from both prediction and label, left out by np.nanmean). Pixels labelled
    `ignore_index` in the target count for nothing."""

    def __init__(self, num_classes, ignore_index=255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.intersection = torch.zeros(num_classes, dtype=torch.int64)
        self.union = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, predicted, target):
        """Integer class maps (N, H, W), predicted by the segmenter and the input control."""
        predicted, target = torch.as_tensor(predicted).long(), torch.as_tensor(target).long()
        keep = target != self.ignore_index
        predicted, target = predicted[keep], target[keep]
        if len(target) and max(predicted.max(), target.max()) >= self.num_classes:
            raise ValueError(f"class labels must be below num_classes = {self.num_classes} (or be the ignore label "
                             f"{self.ignore_index} in the target); got {max(predicted.max(), target.max())}")
        intersection = torch.bincount(target[predicted == target], minlength=self.num_classes)
        self.intersection += intersection
        self.union += (torch.bincount(predicted, minlength=self.num_classes)
                       + torch.bincount(target, minlength=self.num_classes) - intersection)

    @property
    def miou(self):
        present = self.union > 0
        return float((self.intersection[present].double() / self.union[present]).mean())


CONTROL_MAP_MODES = {"depth": "L", "edges": "L", "seg": None}  # grayscale 0-255 maps; class-index maps as stored


def control_alignment(task, generated_path, controls_path, batch_size=16, num_classes=150, ignore_index=255,
                      on_batch=None):
    """Alignment between the maps extracted from generated images (the evaluation depth model's output, the edge
    annotator's, the segmenter's) and the input controls, paired in order (file-name order in folders):
      depth: mean over images of `depth_rmse`;
      edges: means over images of SSIM and MS-SSIM on maps scaled to [0, 1] (data range 1);
      seg:   mIoU over the whole set, `ignore_index` in the controls ignored.
    on_batch(done, total) reports progress."""
    generated = ImageSource(generated_path, CONTROL_MAP_MODES[task])
    controls = ImageSource(controls_path, CONTROL_MAP_MODES[task])
    if len(generated) != len(controls):
        raise ValueError(f"{len(generated)} generated maps for {len(controls)} controls")
    per_image, iou, done = {}, SegmentationIoU(num_classes, ignore_index), 0
    for predicted, control in zip(generated.batches(batch_size), controls.batches(batch_size)):
        if predicted.shape != control.shape:
            raise ValueError(f"generated maps {predicted.shape[1:]} and controls {control.shape[1:]} differ in size")
        predicted, control = torch.from_numpy(predicted), torch.from_numpy(control)
        if task == "depth":
            per_image.setdefault("rmse", []).append(depth_rmse(predicted, control))
        elif task == "edges":
            x, y = predicted[:, None].double() / 255, control[:, None].double() / 255  # (B, 1, H, W) in [0, 1]
            per_image.setdefault("ssim", []).append(ssim(x, y, data_range=1.0))
            per_image.setdefault("ms_ssim", []).append(ms_ssim(x, y, data_range=1.0))
        else:
            iou.update(predicted, control)
        done += len(control)
        if on_batch:
            on_batch(done, len(controls))
    report = {"images": len(controls)}
    report.update({name: float(torch.cat(values).mean()) for name, values in per_image.items()})
    if task == "seg":
        report["miou"] = iou.miou
    return report
