"""prepare.py latents: shards that ref.data.LatentShards reads, holding the VAE's moments of the center-cropped images
(and of their mirrors), posterior samples from per-item seeds with LightningDiT's statistics file, the same files for
1 and 2 ranks and after a stop and rerun, corrupt images skipped and listed, bad input refused with nothing written."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prepare
from ref import latents
from ref.data import LatentShards
from ref.runtime import stream_seed
from ref.safetensors import save_file
from ref.vae import MODELS, to_diffusers

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, SIZE = 48, 32, 32  # landscape files: the center crop keeps columns 8..39
CLASSES, PER_CLASS = ("cat", "dog"), 4
LATENT_SIDE = SIZE // 4  # the tiny preset is f4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir()
        for i in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """A tiny VAE with random weights everywhere (norm affines near 1), written as .safetensors, as a .pt checkpoint
    {"state_dict": ...} and as a diffusers pipeline folder (vae/diffusion_pytorch_model.safetensors in the diffusers
    layout). -> (model, safetensors path, pt path, diffusers folder)"""
    model = MODELS["tiny"]().eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator) + (parameter.ndim == 1))
    folder = tmp_path_factory.mktemp("vae")
    save_file(model.state_dict(), folder / "tiny.safetensors")
    torch.save({"state_dict": model.state_dict()}, folder / "tiny.pt")
    (folder / "pipeline" / "vae").mkdir(parents=True)
    save_file(to_diffusers(model.state_dict(), len(model.encoder.down)),
              folder / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors")
    return model, folder / "tiny.safetensors", folder / "tiny.pt", folder / "pipeline"


def arguments(folder, vae_file, out, *extra):
    return ["latents", "--data-path", folder, "--vae", vae_file, "--vae-kind", "tiny", "--image-size", SIZE,
            "--out", out, "--shard-size", 3, "--batch-size", 2, "--workers", 0, *extra]


def run(*argv):
    prepare.main([str(arg) for arg in argv])


MOMENTS_FLIPPED = ("--store", "moments", "--flip")


@pytest.fixture(scope="module")
def uninterrupted(folder, vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "shards"
    run(*arguments(folder, vae[1], out, *MOMENTS_FLIPPED))
    return out


def cropped_pixels(path):
    """The ADM crop of a landscape file whose short side is already SIZE: the central SIZE columns. (S, S, 3)"""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    left = (WIDTH - SIZE) // 2
    return pixels[:, left:left + SIZE]


def to_input(pixels):
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy()).float()[None] / 127.5 - 1  # (1, 3, S, S)


def files_of(folder):
    return sorted(folder.rglob("*.png"))


def folder_bytes(out):
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


def test_moments_of_the_crop_and_of_its_mirror(folder, vae, uninterrupted):
    model = vae[0]
    shards = LatentShards(uninterrupted, latent_shape=(8, LATENT_SIDE, LATENT_SIDE), scale_factor=1.0)
    files = files_of(folder)
    assert len(shards) == 2 * len(files)
    for i, path in enumerate(files):
        for item, pixels in ((i, cropped_pixels(path)), (len(files) + i, cropped_pixels(path)[:, ::-1])):
            with torch.no_grad():
                mean, logvar = model.encode(to_input(pixels))
            moments, label = shards[item]
            assert label == CLASSES.index(path.parent.name)
            torch.testing.assert_close(moments, torch.cat([mean, logvar], dim=1)[0], atol=1e-5, rtol=1e-5)
    record = json.loads((uninterrupted / "prepare.json").read_text())
    assert (record["items"], record["skipped"], record["files"], record["latent_shape"]) == (8, 0, 8, [8, 8, 8])
    assert (uninterrupted / "skipped.txt").read_text() == ""
    assert not uninterrupted.with_name("shards.partial").exists()
    assert sorted(path.name for path in uninterrupted.glob("latents_*.npy")) == [
        "latents_00000.npy", "latents_00001.npy", "latents_00002.npy",
        "latents_flip_00000.npy", "latents_flip_00001.npy", "latents_flip_00002.npy"]


def test_posterior_samples_from_per_item_seeds_and_their_statistics(folder, vae, tmp_path):
    model, _, pt_file, _ = vae
    out = tmp_path / "shards"
    run(*arguments(folder, pt_file, out, "--store", "sample", "--no-flip", "--seed", 5))
    shards = LatentShards(out, latent_shape=(4, LATENT_SIDE, LATENT_SIDE), scale_factor=1.0)
    files = files_of(folder)
    assert len(shards) == len(files)
    for i, path in enumerate(files):
        with torch.no_grad():
            mean, logvar = model.encode(to_input(cropped_pixels(path)))
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(stream_seed(5, i)))
        torch.testing.assert_close(shards[i][0], (mean + torch.exp(logvar / 2) * noise)[0], atol=1e-5, rtol=1e-5)
    every = torch.stack([shards[i][0] for i in range(len(shards))])  # (N, C, h, w)
    statistics = torch.load(out / "latents_stats.pt", weights_only=True)
    assert sorted(statistics) == ["mean", "std"] and statistics["std"].shape == (1, 4, 1, 1)
    # LightningDiT's compute_latent_stats: mean and std over dims 0, 2, 3
    torch.testing.assert_close(statistics["mean"], every.mean(dim=(0, 2, 3), keepdim=True), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(statistics["std"], every.std(dim=(0, 2, 3), keepdim=True), atol=1e-6, rtol=1e-5)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_write_the_same_files(folder, vae, uninterrupted, tmp_path):
    """Two processes with the environment torchrun gives its workers (no launcher process: one torch import less)."""
    out = tmp_path / "shards"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    ranks = [subprocess.Popen([sys.executable, "prepare.py", *map(str, arguments(folder, vae[1], out,
                                                                                 *MOMENTS_FLIPPED))],
                              cwd=REPO, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert "ETA" in outputs[0][0] and "2 rank(s)" in outputs[0][0] and "rank 0 encodes 2 shard(s)" in outputs[0][0]
    assert folder_bytes(out) == folder_bytes(uninterrupted)


def test_rerun_after_a_stop_continues_to_the_uninterrupted_result(folder, vae, uninterrupted, tmp_path, capsys):
    out = tmp_path / "shards"
    staging = tmp_path / "shards.partial"
    run(*arguments(folder, vae[1], out, *MOMENTS_FLIPPED, "--stop-after-shards", 1))
    assert not out.exists()
    assert (staging / "latents_00000.npy").is_file() and not (staging / "latents_00001.npy").exists()
    (staging / "latents_00001.npy.tmp").write_bytes(b"half a file from a killed process")
    first_shard = (staging / "latents_00000.npy").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:  # other settings than the partial run's
        run(*arguments(folder, vae[1], out, *MOMENTS_FLIPPED, "--seed", 1))
    assert exit_info.value.code == 2 and "seed: 0 there, 1 here" in capsys.readouterr().err
    run(*arguments(folder, vae[1], out, *MOMENTS_FLIPPED))
    assert folder_bytes(out) == folder_bytes(uninterrupted)
    assert (out / "latents_00000.npy").stat().st_mtime_ns == first_shard  # kept, not encoded again
    run(*arguments(folder, vae[1], out, *MOMENTS_FLIPPED))
    assert "nothing to do" in capsys.readouterr().out


def test_a_corrupt_image_is_skipped_and_listed(folder, vae, uninterrupted, tmp_path, capsys):
    images = tmp_path / "images"
    for path in files_of(folder):
        (images / path.parent.name).mkdir(parents=True, exist_ok=True)
        (images / path.parent.name / path.name).write_bytes(path.read_bytes())
    broken = images / "cat" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but no image data")
    out = tmp_path / "shards"
    run(*arguments(images, vae[3], out, "--store", "moments", "--no-flip"))  # the same weights, diffusers layout
    assert f"warning: skipped cannot read image {broken}" in capsys.readouterr().err
    assert (out / "skipped.txt").read_text().startswith(f"{broken}\t")
    record = json.loads((out / "prepare.json").read_text())
    assert (record["files"], record["items"], record["skipped"]) == (9, 8, 1)
    shards = LatentShards(out, latent_shape=(8, LATENT_SIDE, LATENT_SIDE), scale_factor=1.0)
    reference = LatentShards(uninterrupted, latent_shape=(8, LATENT_SIDE, LATENT_SIDE), scale_factor=1.0)
    assert len(shards) == 8
    for i in range(8):  # the readable images, in order, each with its label
        assert shards[i][1] == reference[i][1]
        torch.testing.assert_close(shards[i][0], reference[i][0], atol=1e-5, rtol=1e-5)


def test_bad_input_is_one_error_and_nothing_written(folder, vae, tmp_path, capsys):
    empty, texts, garbage, foreign, taken = (tmp_path / name for name in ("empty", "texts", "garbage.pt",
                                                                          "foreign.pt", "taken"))
    torch.save({"encoder.conv_in.weight": torch.zeros(1), "classifier.weight": torch.zeros(1)}, foreign)
    empty.mkdir()
    (texts / "cat").mkdir(parents=True)
    (texts / "cat" / "notes.txt").write_text("not an image")
    garbage.write_bytes(b"not a checkpoint")
    taken.mkdir()
    (taken / "something.txt").write_text("a file of another program")
    cases = [
        (arguments(folder, vae[1], tmp_path / "out", "--vae-kind", "sd"),
         "is not a 'sd' VAE: its weights are those of the 'tiny' preset"),
        (arguments(folder, foreign, tmp_path / "out"),
         f"is not a 'tiny' VAE: missing keys ({len(vae[0].state_dict()) - 1}), e.g. encoder.conv_in.bias; unexpected "
         f"keys (1), e.g. classifier.weight; shape mismatches (1), e.g. encoder.conv_in.weight expected (32, 3, 3, 3), "
         f"got (1,)\n"),
        (arguments(folder, empty, tmp_path / "out"), f"{empty} is a folder holding none of diffusion_pytorch_model."),
        (arguments(folder, garbage, tmp_path / "out"), f"{garbage} is not a PyTorch checkpoint (neither a zip"),
        (arguments(empty, vae[1], tmp_path / "out"), f"image folder {empty} is empty"),
        (arguments(texts, vae[1], tmp_path / "out"), "notes.txt is not an image file"),
        (arguments(folder, vae[1], tmp_path / "out", "--image-size", 30), "not a multiple of the tiny VAE's"),
        (arguments(folder, vae[1], taken), f"{taken} exists and is not a finished preparation"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            run(*argv)
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.startswith("error: ") and expected in error, error
        assert error.count("\n") == 1 and "Traceback" not in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["empty", "foreign.pt", "garbage.pt", "taken", "texts"]
    assert [path.name for path in taken.iterdir()] == ["something.txt"]


def test_latent_stats_normalise_round_trip_and_bad_files(tmp_path):
    mean, std = torch.randn(1, 3, 1, 1), torch.rand(1, 3, 1, 1) + 0.5
    torch.save({"mean": mean, "std": std}, tmp_path / "stats.pt")
    stats = latents.read_latent_stats(tmp_path / "stats.pt")
    z = torch.randn(2, 3, 4, 4) * std + mean
    normalised = latents.normalise_latents(z, stats)
    assert torch.allclose(normalised.mean(dim=(0, 2, 3)), ((z - mean) / std).mean(dim=(0, 2, 3)))
    assert torch.allclose(latents.denormalise_latents(normalised, stats), z, atol=1e-6)
    torch.save({"mean": mean}, tmp_path / "half.pt")
    torch.save({"mean": mean, "std": -std}, tmp_path / "negative.pt")
    for name in ("missing.pt", "half.pt", "negative.pt"):
        with pytest.raises(ValueError, match="latent statistics file"):
            latents.read_latent_stats(tmp_path / name)
