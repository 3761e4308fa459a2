"""What every sampling run writes: the shares of the ranks gathered in sample order, then OUT/samples.npz (ADM's
layout: arr_0 uint8 N x H x W x 3, arr_1 one integer a sample: its label, scene or prompt), OUT/grid.png,
OUT/settings.json and PNGs; or, for undecoded latents, OUT/latents.npy and OUT/labels.npy.
"""
import io
import json

import numpy as np
from PIL import Image

from ref import runtime


def gather_in_order(share):
    """Every rank's (indices, samples) share -> on rank 0 all samples in sample order; None elsewhere."""
    shares = runtime.gather_to_main(share)
    if shares is None:
        return None
    indices = np.concatenate([indices for indices, _ in shares])  # rank order -> sample order
    return np.concatenate([samples for _, samples in shares])[np.argsort(indices)]


def grid_image(images, columns):
    """(N, H, W, 3) uint8 -> one (rows H, columns W, 3) image, row-major, the last row padded with black."""
    n, height, width, _ = images.shape
    rows = -(-n // columns)
    padded = np.zeros((rows * columns, height, width, 3), dtype=np.uint8)
    padded[:n] = images
    return padded.reshape(rows, columns, height, width, 3).transpose(0, 2, 1, 3, 4).reshape(rows * height, -1, 3)


def png_bytes(image):
    """(H, W, 3) uint8 -> the PNG file's bytes."""
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="PNG")
    return encoded.getvalue()


def numbered(index):
    return f"{index:06d}.png"


def write_pngs(folder, samples, name=numbered):
    """Each sample (N, H, W, 3) uint8 as folder/name(its index)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(samples):
        encoded = png_bytes(image)
        runtime.atomic_write(folder / name(index), lambda file: file.write(encoded))


def write_outputs(out, samples, labels, settings, columns, rows, pictures=None, png_name=numbered, npz=True):
    """Images: samples.npz (unless npz is False: a run scored while sampling that keeps only grid.png's first
    samples), grid.png and with settings["png"] images/<png_name(i)> (default <i:06d>.png); undecoded latents:
    latents.npy and labels.npy. pictures: what grid.png shows, (N, H, W, 3) uint8 (default: the samples)."""
    out.mkdir(parents=True, exist_ok=True)
    if settings["latent"] and settings.get("vae") is None:
        runtime.atomic_write(out / "latents.npy", lambda file: np.save(file, samples))
        runtime.atomic_write(out / "labels.npy", lambda file: np.save(file, labels))
        print("note: wrote latents.npy (the VAE's own latents, ready for its decoder; --vae PATH decodes them into "
              "images) and labels.npy")
    else:
        if npz:
            runtime.atomic_write(out / "samples.npz", lambda file: np.savez(file, arr_0=samples, arr_1=labels))
        pictures = samples if pictures is None else pictures
        grid = png_bytes(grid_image(pictures[:rows * columns], columns))
        runtime.atomic_write(out / "grid.png", lambda file: file.write(grid))
        if settings.get("png"):
            write_pngs(out / "images", samples, png_name)
    runtime.atomic_write(out / "settings.json", lambda file: file.write(json.dumps(settings, indent=2).encode()))
