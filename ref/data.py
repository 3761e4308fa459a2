"""Training data: an image folder, precomputed VAE latents; the one image reader; the data order.

Every dataset puts the network input first and the class label second, so a training loop reads `x, y = sample[:2]`
whatever the source:
  - `ImageFolder`: (image (3, S, S) in [-1, 1], label), center-cropped as ADM / DiT do, optional mirrored copies.
  - `LatentShards`: (what a shard stores per item (C, h, w) times a scale factor, label), memory-mapped `.npy`
    shards (ref.latents.TrainingLatents turns it into the network's input).

No dataset holds random state. The order of the data is `batch_indices(step, ...)`, a function of the step alone, so a
run resumed at step s sees exactly the batches of an uninterrupted run, and the global batch does not depend on the
number of ranks.
"""
import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def check_index(index, length):
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} items")


# ---------------------------------------------------------------------------------------------------------------------
# Image folder: root/<class>/<image>, ADM center crop
# ---------------------------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


def read_image(path, mode="RGB"):
    """The project's one image reader: a file decoded to a PIL image in `mode` (a PIL mode; None keeps it as stored,
    e.g. palette class indices); a file pillow cannot read raises ValueError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert(mode) if mode else image.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None


def to_uint8(images):
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, the project's one conversion to 8-bit pixels: DiT's
    sample_ddp.py, clamp(127.5 x + 128, 0, 255) truncated, i.e. 127.5 (x + 1) rounded half up."""
    return (127.5 * images + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


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
        check_index(index, len(self))
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
    """VAE latents of images, as the encoder returns them (unscaled: a posterior sample or mean, or the moments), in
    shards root/latents_00000.npy (N_k, *latent_shape) float16 or float32 with root/labels_00000.npy (N_k,) integer,
    and so on; items are numbered through the shards in file-name order. Reading multiplies by `scale_factor` (plain
    SD-VAE latents: the model sees scaled latents; decode `latent / scale_factor`). Mirrored images, if wanted, are
    separate encoded items: the latent of a flipped image is not the flipped latent."""

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
        check_index(index, len(self))
        shard = np.searchsorted(self.shard_starts, index, side="right") - 1
        latent = np.array(self.shards[shard][index - self.shard_starts[shard]], dtype=np.float32)  # (4, S/8, S/8)
        return torch.from_numpy(latent) * self.scale_factor, int(self.labels[index])


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
