"""Training data: an image folder, precomputed VAE latents, procedural shape scenes with exact controls; the data order.

Every dataset puts the network input first and the class label second, so a training loop reads `x, y = sample[:2]`
whatever the source:
  - `ImageFolder`: (image (3, S, S) in [-1, 1], label), center-cropped as ADM / DiT do, optional mirrored copies.
  - `LatentShards`: (latent (4, S/8, S/8) times the VAE scale factor, label), memory-mapped `.npy` shards.
  - `Shapes`: `ShapesSample(image, label, caption, depth, segmentation, edges)`, rendered from (seed, index) alone.

No dataset holds random state. The order of the data is `batch_indices(step, ...)`, a function of the step alone, so a
run resumed at step s sees exactly the batches of an uninterrupted run, and the global batch does not depend on the
number of ranks.
"""
import functools
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def _check_index(index, length):
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")


# ---------------------------------------------------------------------------------------------------------------------
# Image folder: root/<class>/<image>, ADM center crop
# ---------------------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


def read_image(path):
    """Decode an image file to an RGB PIL image; a file pillow cannot read raises ValueError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


def center_crop(image, size):
    """ADM / DiT center crop (guided-diffusion `center_crop_arr`): halve with a BOX filter while the short side is at
    least 2 * size, resize with BICUBIC so the short side is size, then cut the central size x size square.
    RGB PIL image -> (size, size, 3) uint8."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    pixels = np.asarray(image)  # (h, w, 3), min(h, w) = size
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top:top + size, left:left + size]


class ImageFolder(Dataset):
    """root/<class>/**/<image>: one class per subfolder, classes sorted by name (label = place in `classes`), files
    sorted by path. Structure and extensions are checked here; an undecodable file fails when it is read.

    flip=True doubles the dataset as EDM does: item i < N is file i, item N + i is file i mirrored left-right. Whether a
    sample is flipped is part of its index, so the shuffled order of `batch_indices` makes the decision, per index and
    reproducibly."""

    def __init__(self, root, size, flip=False):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"image folder {root} does not exist or is not a folder")
        entries = sorted(entry for entry in root.iterdir() if not entry.name.startswith("."))
        if not entries:
            raise ValueError(f"image folder {root} is empty")
        self.classes = [entry.name for entry in entries if entry.is_dir()]
        if not self.classes:
            raise ValueError(f"image folder {root} has no class subfolders (expected {root}/<class>/<image>)")
        self.files, self.labels = [], []
        for label, name in enumerate(self.classes):
            files = sorted(path for path in (root / name).rglob("*")
                           if path.is_file() and not path.name.startswith("."))
            if not files:
                raise ValueError(f"class folder {root / name} holds no images")
            for path in files:
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    raise ValueError(f"{path} is not an image file: extension {path.suffix!r} is none of "
                                     f"{' '.join(IMAGE_EXTENSIONS)}")
            self.files += files
            self.labels += [label] * len(files)
        self.size, self.flip = size, flip

    def __len__(self):
        return len(self.files) * (2 if self.flip else 1)

    def __getitem__(self, index):
        _check_index(index, len(self))
        file_index, mirrored = index % len(self.files), index >= len(self.files)
        pixels = center_crop(read_image(self.files[file_index]), self.size)  # (S, S, 3) uint8
        if mirrored:
            pixels = pixels[:, ::-1]
        image = torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float() / 127.5 - 1  # (3, S, S) in [-1, 1]
        return image, self.labels[file_index]


# ---------------------------------------------------------------------------------------------------------------------
# Precomputed latents: .npy shards plus labels
# ---------------------------------------------------------------------------------------------------------------------

SD_VAE_SCALE_FACTOR = 0.18215  # Stable Diffusion VAE (LDM): scaled latents have about unit variance


def _load_array(path):
    """Memory-map an .npy file; a missing or malformed file raises ValueError naming it."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read array file {path}: {error}") from None


class LatentShards(Dataset):
    """VAE latents of images, as the encoder returns them (unscaled; the posterior mean or a sample), in shards
    root/latents_00000.npy (N_k, 4, S/8, S/8) float16 or float32 with root/labels_00000.npy (N_k,) integer, and so on;
    items are numbered through the shards in file-name order. Reading multiplies by `scale_factor` (the model sees
    scaled latents; decode `latent / scale_factor`). Mirrored images, if wanted, are separate encoded items: the latent
    of a flipped image is not the flipped latent."""

    def __init__(self, root, latent_shape=(4, 32, 32), scale_factor=SD_VAE_SCALE_FACTOR):
        root, latent_shape = Path(root), tuple(latent_shape)
        latent_files = sorted(root.glob("latents_*.npy"))
        if not latent_files:
            raise ValueError(f"no latent shards latents_*.npy in {root}")
        self.shards, labels = [], []
        for latent_file in latent_files:
            label_file = latent_file.with_name("labels_" + latent_file.name.removeprefix("latents_"))
            latents, shard_labels = _load_array(latent_file), _load_array(label_file)
            if latents.shape[1:] != latent_shape or latents.dtype not in (np.float16, np.float32):
                raise ValueError(f"latent shard {latent_file}: expected shape (N, {', '.join(map(str, latent_shape))}) "
                                 f"float16 or float32, got {latents.shape} {latents.dtype}")
            if shard_labels.shape != latents.shape[:1] or shard_labels.dtype.kind not in "iu":
                raise ValueError(f"label file {label_file}: expected shape ({len(latents)},) integer to match "
                                 f"{latent_file.name}, got {shard_labels.shape} {shard_labels.dtype}")
            self.shards.append(latents)
            labels.append(shard_labels)
        self.labels = np.concatenate(labels).astype(np.int64)  # (N,) all labels in memory
        self.shard_starts = np.cumsum([0] + [len(shard) for shard in self.shards])  # shard k: [starts[k], starts[k+1])
        self.scale_factor = scale_factor

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        _check_index(index, len(self))
        shard = np.searchsorted(self.shard_starts, index, side="right") - 1
        latent = np.array(self.shards[shard][index - self.shard_starts[shard]], dtype=np.float32)  # (4, S/8, S/8)
        return torch.from_numpy(latent) * self.scale_factor, int(self.labels[index])


# ---------------------------------------------------------------------------------------------------------------------
# Shapes: procedural scenes with exact depth, segmentation and edges
# ---------------------------------------------------------------------------------------------------------------------

SHAPE_CLASSES = ("circle", "square", "triangle", "ring", "cross")
COLORS = {  # RGB in [0, 1], each with a largest channel of 1, so a surface's brightest channel is its shade
    "red": (1.0, 0.15, 0.15), "green": (0.15, 1.0, 0.2), "blue": (0.25, 0.4, 1.0),
    "yellow": (1.0, 0.9, 0.1), "magenta": (1.0, 0.2, 0.9), "cyan": (0.1, 0.9, 1.0),
}
CAPTION_VOCABULARY = ("a", "and", *COLORS, *SHAPE_CLASSES)  # captions split on whitespace into these words
MAX_OBJECTS = 3
OBJECT_DEPTH_RANGE = (0.35, 1.0)  # objects lie in front of the whole ground plane, whose depth is in [0, 0.3]
OBJECT_DEPTH_GAP = 0.15  # least depth difference between two objects of a scene
GROUND_DEPTH_RANGE = (0.0, 0.3)  # top row (far) .. bottom row (near)
GROUND_COLOR = (0.55, 0.55, 0.55)


def shade(depth):
    """Brightness of a surface at `depth` (1 = nearest): nearer is brighter. The colour drawn is COLOR * shade."""
    return 0.3 + 0.7 * depth


def _box(u, v, half_width, half_height):
    return np.maximum(np.abs(u) - half_width, np.abs(v) - half_height)


_TRIANGLE_NORMALS = [(math.cos(a), math.sin(a)) for a in math.pi / 2 + 2 * math.pi / 3 * np.arange(3)]

# Signed distance (negative inside) of each shape of radius r, in its own frame (u, v); every shape fits in the disc r.
SHAPE_DISTANCES = {
    "circle": lambda u, v, r: np.hypot(u, v) - r,
    "square": lambda u, v, r: _box(u, v, 0.7 * r, 0.7 * r),
    "triangle": lambda u, v, r: np.maximum.reduce([nu * u + nv * v for nu, nv in _TRIANGLE_NORMALS]) - r / 2,
    "ring": lambda u, v, r: np.abs(np.hypot(u, v) - 0.75 * r) - 0.25 * r,
    "cross": lambda u, v, r: np.minimum(_box(u, v, 0.9 * r, 0.3 * r), _box(u, v, 0.3 * r, 0.9 * r)),
}


def occluding_contours(segmentation, depth):
    """Edges: the pixels of a segment that have a 4-neighbour in another segment farther away, i.e. each visible
    object's outline against the background and against what it occludes, one pixel wide, on the nearer side.
    (H, W) long, (H, W) float -> (H, W) bool."""
    edges = np.zeros(segmentation.shape, dtype=bool)
    for segments, depths, outline in ((segmentation, depth, edges), (segmentation.T, depth.T, edges.T)):  # down, right
        boundary = segments[:-1] != segments[1:]  # neighbours in different segments
        upper_nearer = depths[:-1] > depths[1:]
        outline[:-1] |= boundary & upper_nearer
        outline[1:] |= boundary & ~upper_nearer
    return edges


class ShapesSample(NamedTuple):
    image: torch.Tensor  # (3, H, W) float32 in [-1, 1]
    label: int  # class of the front object, an index into SHAPE_CLASSES
    caption: str  # e.g. "a red circle and a blue square", front object first
    depth: torch.Tensor  # (1, H, W) float32 in [0, 1], 1 = nearest
    segmentation: torch.Tensor  # (H, W) int64: 0 background, 1 + class of the visible object
    edges: torch.Tensor  # (1, H, W) float32 in {0, 1}: occluding contours


class Shapes(Dataset):
    """1 to MAX_OBJECTS flat shapes of distinct classes on a ground plane, rendered from a generator seeded by
    (seed, index) alone: the same (seed, index) gives the same scene at any resolution, and nothing depends on the
    order of reads. `num_items` only sets the epoch length.

    Depth (1 = nearest, like the disparity maps ControlNet is trained with) is visible in three ways: objects are drawn
    back to front, so nearer ones occlude farther ones; every surface is shaded by its depth (`shade`, nearer is
    brighter); and an object's radius grows with its depth. The ground plane recedes from the bottom row (depth 0.3)
    to the top row (0) and lies behind every object. Objects sit wholly inside the frame, so the front one is never
    hidden; the label is its class, and the caption names it first. Image edges are anti-aliased from the signed
    distance; the controls are exact at the pixel centres, where a pixel belongs to a shape iff its coverage > 1/2."""

    def __init__(self, size=32, num_items=50_000, seed=0):
        self.size, self.num_items, self.seed = size, num_items, seed
        centres = (np.arange(size) + 0.5) / size  # pixel centres in units of the image side
        self.xs, self.ys = centres[None, :], centres[:, None]  # (1, W), (H, 1)

    def __len__(self):
        return self.num_items

    def scene(self, index):
        """The random draws of scene `index`, objects ordered far to near: classes, colour names, depths, radii,
        centres (n, 2) as (x, y), angles; all lengths in units of the image side."""
        rng = np.random.default_rng([self.seed, index])
        count = int(rng.integers(1, MAX_OBJECTS + 1))
        classes = rng.permutation(len(SHAPE_CLASSES))[:count]
        colors = [list(COLORS)[i] for i in rng.integers(0, len(COLORS), count)]
        low, high = OBJECT_DEPTH_RANGE  # sorted draws spread by the gap: increasing, OBJECT_DEPTH_GAP apart at least
        depths = low + np.sort(rng.uniform(0, high - low - (count - 1) * OBJECT_DEPTH_GAP, count))
        depths += OBJECT_DEPTH_GAP * np.arange(count)
        radii = (0.1 + 0.16 * depths) * rng.uniform(0.85, 1.15, count)
        centres = radii[:, None] + (1 - 2 * radii[:, None]) * rng.uniform(0, 1, (count, 2))
        angles = rng.uniform(0, 2 * math.pi, count)
        return classes, colors, depths, radii, centres, angles

    def __getitem__(self, index):
        _check_index(index, len(self))
        classes, colors, depths, radii, centres, angles = self.scene(index)
        ground_low, ground_high = GROUND_DEPTH_RANGE
        depth = np.broadcast_to(ground_low + (ground_high - ground_low) * self.ys, (self.size, self.size)).copy()
        image = np.asarray(GROUND_COLOR)[:, None, None] * shade(depth)  # (3, H, W)
        segmentation = np.zeros((self.size, self.size), dtype=np.int64)  # (H, W)
        for shape_class, color, object_depth, radius, (cx, cy), angle in zip(classes, colors, depths, radii, centres,
                                                                           angles):
            dx, dy = self.xs - cx, self.ys - cy  # (1, W), (H, 1)
            cos, sin = math.cos(angle), math.sin(angle)
            distance = SHAPE_DISTANCES[SHAPE_CLASSES[shape_class]](cos * dx + sin * dy, cos * dy - sin * dx, radius)
            coverage = np.clip(0.5 - distance * self.size, 0, 1)  # (H, W), distance in pixels, 1/2 at the outline
            image += coverage * (np.asarray(COLORS[color])[:, None, None] * shade(object_depth) - image)
            inside = distance < 0
            segmentation[inside], depth[inside] = shape_class + 1, object_depth
        edges = occluding_contours(segmentation, depth)
        caption = " and ".join(f"a {color} {SHAPE_CLASSES[c]}" for c, color in zip(classes[::-1], colors[::-1]))
        return ShapesSample(image=torch.from_numpy(image * 2 - 1).float(), label=int(classes[-1]), caption=caption,
                            depth=torch.from_numpy(depth).float()[None], segmentation=torch.from_numpy(segmentation),
                            edges=torch.from_numpy(edges).float()[None])


# ---------------------------------------------------------------------------------------------------------------------
# Data order: deterministic and resumable, independent of the number of ranks
# ---------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def epoch_permutation(num_items, seed, epoch):
    """The order of the items in epoch `epoch`: a permutation from a generator seeded by (seed, epoch).
    (num_items,) int64, read-only (it is cached)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    order.flags.writeable = False
    return order


def stream_positions(step, batch_size, rank, world_size):
    """Places in the endless data stream of rank `rank`'s share of global step `step`: of the stream positions
    [s B, (s + 1) B), B = batch_size the global batch, the r-th of world_size contiguous blocks. A position names one
    training sample for the whole run, whatever the number of ranks (train.py seeds each sample's noise with it).
    (B / world_size,) int64."""
    if batch_size % world_size:
        raise ValueError(f"global batch size {batch_size} is not divisible by world size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    per_rank = batch_size // world_size
    return step * batch_size + rank * per_rank + np.arange(per_rank)


def batch_indices(step, batch_size, rank, world_size, seed, num_items):
    """Dataset indices of rank `rank`'s share of global step `step`.

    The data is one endless stream, the epoch permutations one after another; step s takes stream positions
    [s B, (s + 1) B), B = batch_size the global batch, and rank r the r-th of world_size contiguous blocks of them
    (`stream_positions`). So the data is a function of the step alone (resuming at step s reproduces it exactly), the
    global batch in rank order is the same for any world_size, and the ranks of a step never share a position.
    (B / world_size,) int64."""
    positions = stream_positions(step, batch_size, rank, world_size)  # (B / world_size,) places in the stream
    epochs, offsets = np.divmod(positions, num_items)
    return np.concatenate([epoch_permutation(num_items, seed, int(epoch))[offsets[epochs == epoch]]
                           for epoch in np.unique(epochs)])
