"""Latent preparation (prepare.py latents): an image folder encoded by a KL autoencoder (ref/vae.py) into shards.

What a shard holds, per VAE recipe (`STORES`):
  moments  the SiT / IG recipe (SD VAE): the posterior moments, mean and logvar concatenated on the channel axis as
           LDM's quant_conv returns them, (N, 2C, h, w). The training step draws a fresh latent from them every time,
           `AutoencoderKL.posterior_sample` with the sample's own generator, then scales it by 0.18215.
           (The IG release stores mean and std, REPA's `img-mean-std` files, and draws mean + std * randn per step.)
  sample   the LightningDiT recipe (VA-VAE): one posterior sample per item, (N, C, h, w), as its extract_features.py
           stores `posterior.sample()`; here the noise of file i comes from a generator seeded by (seed, i), of its
           mirror by (seed, F + i) (F files), so the result does not depend on ranks or batches. Training normalises
           by the per-channel statistics file.

Shards are files [k * shard_size, (k + 1) * shard_size) of the sorted ImageFolder listing; their items are numbered
through the shards as ref.data.LatentShards reads them. With flip, the mirror of item i is item N + i (N images
stored), as in ImageFolder(flip=True): the mirrors live in latents_flip_k.npy, which sorts after every latents_k.npy.

Training reads a shard folder through `TrainingLatents`: the store named by its prepare.json, or, without one, plain
latents (N, C, h, w) that are multiplied by the VAE's scale factor (the format before prepare.json).
"""
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ref.checkpoints import check_state_fits, misfit_line, read_expected, read_state_dict
from ref.data import LatentShards
from ref.runtime import SampleDraws, damaged_files, stream_seed
from ref.vae import MODELS, AutoencoderKL, load_state, native_state

STORES = ("moments", "sample")
# What each release stores: the IG release's SiT (REPA's preprocessing) encodes each image once, unflipped; LightningDiT
# encodes each image and its mirror and reads one of the two at random.
RECIPES = {"sd": dict(store="moments", flip=False), "vavae-f16d32": dict(store="sample", flip=True),
           "tiny": dict(store="moments", flip=False)}
STATS_FILE = "latents_stats.pt"  # LightningDiT's name: {"mean", "std"}, each (1, C, 1, 1) float32
SETTINGS_FILE = "prepare.json"


def on_meta(kind):
    with torch.device("meta"):
        return MODELS[kind]()


@functools.lru_cache
def vae_geometry(kind):
    """(z channels, downsampling factor, scaling factor) of the ref.vae.MODELS preset `kind`; an unknown name raises
    ValueError."""
    if kind not in MODELS:
        raise ValueError(f"unknown vae {kind!r}; choose one of {', '.join(MODELS)}")
    vae = on_meta(kind)
    return vae.z_channels, vae.downsampling_factor, vae.scaling_factor


def misfit_summary(kind, state):
    """One line on why `state` is not a `kind` VAE: the preset it does fit, else each kind of problem with a count
    and its first key (ref.checkpoints.check_state_fits lists them all, one line per kind)."""
    for other in MODELS:
        try:
            check_state_fits(on_meta(other), *native_state(on_meta(other), state))
            return f"its weights are those of the {other!r} preset"
        except ValueError as error:
            if other == kind:
                summary = misfit_line(error)
    return summary


def read_vae(path, kind):
    """The `kind` preset of ref.vae.MODELS with the weights of `path` (.safetensors, or a PyTorch file holding a state
    dict in any layout ref.vae.load_state reads, or a diffusers folder holding one), frozen, on the CPU. Built on the
    meta device, so a file of the wrong kind is refused before any weight is initialised. A file that is not such a
    VAE raises ValueError naming it, in one line."""
    path = Path(path)
    if (path / "vae").is_dir():  # a diffusers pipeline folder: its VAE is the model folder vae/
        path = path / "vae"
    state = read_state_dict(path, f"the weights of a {kind!r} VAE")[0]
    model = on_meta(kind).to_empty(device="cpu")
    try:
        load_state(model, state)
    except ValueError:
        raise ValueError(f"{path} is not a {kind!r} VAE: {misfit_summary(kind, state)}") from None
    return model.eval().requires_grad_(False)


def listing_digest(images, root):
    """sha256 of the listing of ImageFolder `images` read from `root` (relative path and label of every file, in
    order): a changed folder changes it."""
    digest = hashlib.sha256()
    for path, label in zip(images.files, images.labels):
        digest.update(f"{path.relative_to(root)}\t{label}\n".encode())
    return digest.hexdigest()


def shard_files(shard, flip):
    """File names of shard `shard`: labels and latents, and their mirrored counterparts with flip."""
    stems = [f"{shard:05d}"] + ([f"flip_{shard:05d}"] if flip else [])
    return [f"{kind}_{stem}.npy" for stem in stems for kind in ("labels", "latents")]


class ShardImages(Dataset):
    """Files [start, stop) of an ImageFolder. Item -> (file index, image (3, S, S) in [-1, 1] or None, label,
    the reason the file could not be read or None): a corrupt file is reported, not raised."""

    def __init__(self, images, start, stop):
        self.images, self.indices = images, range(start, stop)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position):
        index = self.indices[position]
        try:
            image, label = self.images[index]
        except ValueError as error:  # ref.data.read_image: the file names itself
            return index, None, self.images.labels[index], str(error)
        return index, image, label, None


def collate_items(items):
    """-> (file indices of the readable images, their images (B, 3, S, S), labels (B,), [(file index, reason)])."""
    readable = [item for item in items if item[1] is not None]
    images = torch.stack([item[1] for item in readable]) if readable else None
    return ([item[0] for item in readable], images, torch.tensor([item[2] for item in readable], dtype=torch.int64),
            [(item[0], item[3]) for item in items if item[1] is None])


@torch.no_grad()
def encode_items(vae, images, items, store, seed):
    """What a shard stores (`STORES`) for images (B, 3, S, S) on the VAE's device whose dataset item numbers are
    `items`: moments (B, 2C, h, w) or a posterior sample (B, C, h, w), float32 on the CPU."""
    mean, logvar = (moment.float().cpu() for moment in vae.encode(images))  # (B, C, h, w) each
    if store == "moments":
        return torch.cat([mean, logvar], dim=1)
    return AutoencoderKL.posterior_sample(mean, logvar, SampleDraws(stream_seed(seed, item) for item in items))


def channel_statistics(arrays, chunk=1024):
    """Per-channel mean and standard deviation (unbiased, as torch.std) over every item and position of arrays
    (N_k, C, h, w), read `chunk` items at a time in float64 and combined exactly (Chan, Golub and LeVeque's pairwise
    update of count, mean and sum of squared deviations). -> {"mean", "std"}, each (1, C, 1, 1) float32, the layout
    of LightningDiT's latents_stats.pt."""
    count, mean, squares = 0, 0.0, 0.0
    for array in arrays:
        for start in range(0, len(array), chunk):
            x = np.asarray(array[start:start + chunk], dtype=np.float64)  # (n, C, h, w)
            n = x.shape[0] * x.shape[2] * x.shape[3]
            part_mean = x.mean(axis=(0, 2, 3))  # (C,)
            part_squares = ((x - part_mean[:, None, None]) ** 2).sum(axis=(0, 2, 3))
            delta, total = part_mean - mean, count + n
            mean = mean + delta * n / total
            squares = squares + part_squares + delta ** 2 * count * n / total
            count = total
    std = np.sqrt(squares / (count - 1))
    return {name: torch.from_numpy(value).float().reshape(1, -1, 1, 1) for name, value in (("mean", mean),
                                                                                            ("std", std))}


# ---------------------------------------------------------------------------------------------------------------------
# LightningDiT's latent normalisation (the statistics file written by prepare.py, or the release's latents_stats.pt)
# ---------------------------------------------------------------------------------------------------------------------

def read_latent_stats(path):
    """A latent statistics file {"mean", "std"}, each (1, C, 1, 1) -> (mean, std) float32; a missing or malformed
    file raises ValueError saying what was expected and where it comes from."""
    expected = (f"a latent statistics file ({STATS_FILE}: a dict with 'mean' and 'std' tensors of shape (1, C, 1, 1), "
                f"written by `prepare.py latents --vae-kind vavae-f16d32` or shipped with the LightningDiT release)")
    contents = read_expected(path, expected)
    stats = [contents.get(name) if isinstance(contents, dict) else None for name in ("mean", "std")]
    if any(not isinstance(value, torch.Tensor) or value.dim() != 4 or value.shape[::2] != (1, 1) for value in stats) \
            or stats[0].shape != stats[1].shape or not (stats[1] > 0).all():
        raise ValueError(f"{path} is not {expected}, with every std positive")
    return stats[0].float(), stats[1].float()


def normalise_latents(z, stats):
    """LightningDiT's latent normalisation (its dataset, multiplier 1.0): (z - mean) / std per channel.
    z (N, C, h, w)"""
    mean, std = (value.to(z.device) for value in stats)
    return (z - mean) / std


def denormalise_latents(z, stats):
    """The inverse, before decoding (its sampler): z * std + mean per channel. z (N, C, h, w)"""
    mean, std = (value.to(z.device) for value in stats)
    return z * std + mean


# ---------------------------------------------------------------------------------------------------------------------
# Training on the shards: what a shard stores -> the network's input
# ---------------------------------------------------------------------------------------------------------------------

def shard_settings(root):
    """The settings prepare.py recorded in a shard folder (prepare.json: store, vae_kind, ...), or {"store": "plain"}
    for latents written by other tools; an unreadable file raises ValueError naming it."""
    settings_file = Path(root) / SETTINGS_FILE
    if not settings_file.is_file():
        return {"store": "plain"}
    try:
        return json.loads(settings_file.read_text())
    except ValueError as error:
        raise ValueError(f"cannot read {settings_file}: {error}") from None


class TrainingLatents:
    """A shard folder as training reads it: `dataset` (ref.data.LatentShards of what is stored) and `network_input`,
    which turns a batch of it into what the network learns to generate.

    store (prepare.json's; "plain" without one): moments -> a posterior sample drawn at every step, times the VAE's
    scaling factor (the SiT / IG recipe); sample -> normalised by SHARDS/latents_stats.pt (LightningDiT's recipe);
    plain -> the stored latents times the scaling factor (LatentShards applies it). vae: the ref.vae.MODELS preset
    the run expects, checked against prepare.json's; latent_shape (C, h, w) of the network input. A folder that does
    not fit raises ValueError naming the file and the settings."""

    def __init__(self, root, vae, latent_shape):
        root = Path(root)
        settings, settings_file = shard_settings(root), root / SETTINGS_FILE
        if settings.get("vae_kind", vae) != vae:
            raise ValueError(f"{settings_file}: the latents were encoded by the {settings['vae_kind']!r} VAE, the run "
                             f"expects {vae!r}; set --vae {settings['vae_kind']} or prepare the data with --vae-kind "
                             f"{vae}")
        self.store, self.scaling_factor = settings["store"], vae_geometry(vae)[2]
        if self.store not in (*STORES, "plain"):
            raise ValueError(f"{settings_file}: unknown store {self.store!r}; expected one of {', '.join(STORES)}")
        damaged = damaged_files(root, settings.get("digests", {}))  # prepare.py's record of every file it wrote
        if damaged:
            raise ValueError(f"{root / damaged[0]} is missing or damaged: its bytes differ from the digest in "
                             f"{settings_file} ({len(damaged)} file(s) so); prepare the data again")
        channels, side, _ = latent_shape
        stored_shape = (2 * channels if self.store == "moments" else channels, side, side)
        try:
            self.dataset = LatentShards(root, stored_shape, self.scaling_factor if self.store == "plain" else 1.0)
        except ValueError as error:
            raise ValueError(f"{error}; the {vae} VAE's {self.store} at this --image-size are {stored_shape}") from None
        self.stats = read_latent_stats(root / STATS_FILE) if self.store == "sample" else None

    def network_input(self, stored, draws):
        """stored (N, C_stored, h, w) on the CPU, draws the samples' generators (ref.runtime.SampleDraws), of which
        the moments' posterior sample is each sample's first draw -> (N, C, h, w)."""
        if self.store == "moments":
            mean, logvar = stored.chunk(2, dim=1)  # (N, C, h, w) each
            return AutoencoderKL.posterior_sample(mean, logvar, draws) * self.scaling_factor
        if self.store == "sample":
            return normalise_latents(stored, self.stats)
        return stored
