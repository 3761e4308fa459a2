"""sample.py: the same samples whatever the batch size and the number of ranks, sample i drawn from seed + i, the
output files, guidance flags and intervals reaching the network, eps and latent models, foreign checkpoints with the
IG release's key names, and bad input (exit 2, a message, nothing written)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from ref import jobs, training
from ref.dit import MODELS

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
TINY = dict(training.CONFIGS["shapes-tiny"], depth=2, hidden_size=32, num_heads=4, config="shapes-tiny")
GUIDED = ["--steps", "8", "--ig", "1.5", "--ig-interval", "0.3", "1", "--cfg", "1.5", "--cfg-interval", "0", "0.7"]


def randomise(model, seed=0, scale=0.05):
    """Random weights everywhere: the zero init would make every sample its initial noise, and both heads equal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return model


def make_run(folder, **overrides):
    """A run folder whose latest.pt holds a random tiny model (as train.py writes it)."""
    config = dict(TINY, **overrides)
    model = randomise(jobs.DiTJob(config).build())
    folder.mkdir(parents=True)
    optimizer = torch.optim.AdamW(model.parameters())
    training.save_checkpoint(folder / "latest.pt", model, model, optimizer, 0, config)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny")


def sample_images(run_folder, out, *flags):
    sample.main([str(run_folder), "--out", str(out), *map(str, flags)])
    with np.load(out / "samples.npz") as samples:
        return samples["arr_0"], samples["arr_1"]


def assert_same_images(a, b):
    """Equal, up to a rare one-level step: CPU matmul kernels round differently for different row counts (a batch of 1
    against one of 7), about 1e-7 relative, which can carry a value across a rounding boundary of the uint8 map."""
    assert a.shape == b.shape
    difference = np.abs(a.astype(int) - b.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_samples_do_not_depend_on_batch_size_or_ranks(run, tmp_path):
    one_by_one, labels = sample_images(run, tmp_path / "b1", "--num-samples", 7, "--batch-size", 1, *GUIDED)
    together, labels_together = sample_images(run, tmp_path / "b7", "--num-samples", 7, "--batch-size", 7, *GUIDED)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "sample.py", str(run), "--out", str(tmp_path / "r2"), "--num-samples", "7",
                             "--batch-size", "2", *GUIDED], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "r2" / "samples.npz") as two_ranks:
        assert_same_images(two_ranks["arr_0"], one_by_one)
        assert np.array_equal(two_ranks["arr_1"], labels)
    assert_same_images(together, one_by_one)
    assert np.array_equal(labels, np.arange(7) % 5) and np.array_equal(labels_together, labels)
    assert one_by_one.std() > 20 and len({image.tobytes() for image in one_by_one}) == 7  # real, distinct images


def test_sample_i_is_drawn_from_seed_plus_i(run, tmp_path):
    from_seed_0, _ = sample_images(run, tmp_path / "s0", "--num-samples", 3, "--seed", 0, "--class-label", 2, *GUIDED)
    from_seed_1, _ = sample_images(run, tmp_path / "s1", "--num-samples", 2, "--seed", 1, "--class-label", 2, *GUIDED)
    assert_same_images(from_seed_1, from_seed_0[1:])
    assert np.abs(from_seed_0[0].astype(int) - from_seed_0[1]).mean() > 10


def test_output_files(run, tmp_path):
    images, labels = sample_images(run, tmp_path, "--num-samples", 7, "--grid-rows", 8, *GUIDED)
    assert images.dtype == np.uint8 and images.shape == (7, 32, 32, 3) and labels.shape == (7,)
    with Image.open(tmp_path / "grid.png") as grid:  # 5 columns (one per class), 2 rows, the last padded
        assert grid.size == (5 * 32, 2 * 32)
        assert np.array_equal(np.asarray(grid)[32:64, 32:64], images[6])
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["sampler"] == "em" and settings["steps"] == 8 and settings["network_evaluations_per_sample"] == 16
    assert settings["ig_interval"] == [0.3, 1.0] and settings["config"]["depth"] == 2 and settings["step"] == 0


def test_guidance_weights_and_intervals_reach_the_network(run, tmp_path):
    heun = ["--num-samples", 2, "--sampler", "heun", "--steps", 3]
    unguided, _ = sample_images(run, tmp_path / "plain", *heun)
    for flag in ("--ig", "--cfg"):
        guided, _ = sample_images(run, tmp_path / flag, *heun, flag, 3)
        outside, _ = sample_images(run, tmp_path / (flag + "-outside"), *heun, flag, 3, flag + "-interval", 2, 3)
        assert (guided != unguided).mean() > 0.2  # most pixels move (the random heads differ little)
        assert_same_images(outside, unguided)  # an interval that holds no t of the grid: no guidance


def test_eps_model_ddim_and_ddpm(tmp_path, capsys):
    run = make_run(tmp_path / "eps", objective="eps")
    ddim, _ = sample_images(run, tmp_path / "ddim", "--num-samples", 2, "--sampler", "ddim", "--steps", 4,
                            "--ig", 2, "--ig-interval", 0.3, 1)
    ddpm, _ = sample_images(run, tmp_path / "ddpm", "--num-samples", 1)  # the default: all 1000 steps
    assert ddim.shape == (2, 32, 32, 3) and ddpm.shape == (1, 32, 32, 3)
    assert json.loads((tmp_path / "ddpm" / "settings.json").read_text())["network_evaluations_per_sample"] == 1000
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(run), "--sampler", "em", "--out", str(tmp_path / "em")])
    assert exit_info.value.code == 2 and "does not fit a eps model" in capsys.readouterr().err


def test_latent_model_writes_latents_and_says_why(tmp_path, capsys):
    run = make_run(tmp_path / "latent", data="latents", patch_size=2)  # 32 px images: (4, 4, 4) latents
    sample.main([str(run), "--num-samples", "3", "--steps", "4", "--out", str(tmp_path / "out")])
    assert "VAE decoder is not part of this repository" in capsys.readouterr().out
    assert np.load(tmp_path / "out" / "latents.npy").shape == (3, 4, 4, 4)
    assert np.array_equal(np.load(tmp_path / "out" / "labels.npy"), [0, 1, 2])
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_ig_release_checkpoint_loads_with_a_preset(tmp_path):
    """The IG release names its head final_layer_xr; --model DiT-S/2 --intermediate-block 4 reads it."""
    with torch.device("meta"):
        shapes = MODELS["DiT-S/2"](input_size=8, intermediate_block=4).state_dict()
    generator = torch.Generator().manual_seed(0)
    release = {key.replace("intermediate_head.", "final_layer_xr."): torch.randn(value.shape, generator=generator) / 50
               for key, value in shapes.items()}
    torch.save({"ema": release}, tmp_path / "sit-ig.pt")
    sample.main([str(tmp_path / "sit-ig.pt"), "--model", "DiT-S/2", "--image-size", "64", "--intermediate-block", "4",
                 "--ig", "2", "--num-samples", "2", "--sampler", "heun", "--steps", "2",
                 "--out", str(tmp_path / "out")])
    latents = np.load(tmp_path / "out" / "latents.npy")
    assert latents.shape == (2, 4, 8, 8) and np.isfinite(latents).all()


BAD_INPUT = ["missing", "not a checkpoint", "another model", "ig without head", "foreign mismatch"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_the_message_and_writes_nothing(case, run, tmp_path, capsys):
    argv, message = {
        "missing": ([str(tmp_path / "nowhere")], "no checkpoint at"),
        "not a checkpoint": ([str(tmp_path / "junk.pt")], "cannot read checkpoint"),
        "another model": ([str(run), "--model", "DiT-S/2"], "does not fit this DiT"),
        "ig without head": ([str(make_run(tmp_path / "plain", intermediate_block=None)), "--ig", "2"],
                            "needs a model with the IG intermediate head"),
        "foreign mismatch": ([str(tmp_path / "dit-s4.pt"), "--model", "DiT-S/2", "--image-size", "64"],
                             "x_embedder.proj.weight expected (384, 4, 2, 2), got (384, 4, 4, 4)"),
    }[case]
    (tmp_path / "junk.pt").write_bytes(b"\x00 not a pickle")
    if case == "foreign mismatch":
        torch.save(MODELS["DiT-S/4"](input_size=8).state_dict(), tmp_path / "dit-s4.pt")
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
