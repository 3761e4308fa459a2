"""train.py: two ranks stay bitwise in step (and match one rank up to the order of gradient sums), a killed-and-resumed
run is bitwise the uninterrupted one (flow and eps objectives; loader workers and gradient checkpointing change
nothing), a kill during a checkpoint write leaves the previous checkpoint, bad input exits 2 with a message and writes
nothing; latent shards train; the FLOP count behind MFU against the closed form; the ImageNet configs are the SiT
presets."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from ref import jobs, training
from ref.dit import MODELS, count_parameters, read_checkpoint

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
TINY = ["--config", "shapes-tiny", "--depth", "2", "--hidden-size", "32", "--batch-size", "8", "--lr", "1e-3",
        "--log-every", "1"]
STEPS = ["--steps", "6", "--checkpoint-every", "2"]


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_error(argv, capsys):
    """train.main(argv) must stop with exit status 2; -> what it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(list(map(str, argv)))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def assert_same_state(a, b):
    """Nested dicts / lists of tensors and numbers, bitwise equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 6 steps in one go."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train.main([*TINY, *STEPS, "--out", str(out)])
    return read_checkpoint(out / "latest.pt"), out


def test_two_ranks_end_with_identical_weights(uninterrupted, tmp_path):
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        *TINY, *STEPS, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    digests = dict(re.findall(r"rank (\d): weights sha256 (\w+)", result.stdout))
    assert sorted(digests) == ["0", "1"] and digests["0"] == digests["1"]
    checkpoint = read_checkpoint(tmp_path / "latest.pt")
    assert training.weights_digest(checkpoint["model"]) == digests["0"]
    # The per-sample draws do not depend on the number of ranks: the first loss (before any update) is the
    # single-process one, and after 6 steps the weights differ only by the order of the gradient sums.
    single, single_out = uninterrupted
    losses = [[json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
              for out in (tmp_path, single_out)]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    assert not np.allclose(losses[0][0], losses[0][-1])  # it trained
    for key, value in single["model"].items():
        torch.testing.assert_close(checkpoint["model"][key], value, atol=1e-6, rtol=1e-5)


def test_killed_and_resumed_run_is_bitwise_the_uninterrupted_one(uninterrupted, tmp_path):
    train.main([*TINY, *STEPS, "--out", str(tmp_path), "--stop-after", "3"])  # stops as if killed after step 3
    assert read_checkpoint(tmp_path / "latest.pt")["step"] == 3
    train.main([*TINY, *STEPS, "--out", str(tmp_path)])  # the same command resumes
    resumed, (reference, _) = read_checkpoint(tmp_path / "latest.pt"), uninterrupted
    assert resumed["step"] == 6
    for part in ("model", "ema", "opt"):
        assert_same_state(resumed[part], reference[part])
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "resumed at step 3" in (tmp_path / "log.txt").read_text()


def test_loader_workers_and_gradient_checkpointing_do_not_change_the_run(uninterrupted, tmp_path):
    train.main([*TINY, *STEPS, "--out", str(tmp_path), "--workers", "2", "--gradient-checkpointing"])
    assert_same_state(read_checkpoint(tmp_path / "latest.pt")["model"], uninterrupted[0]["model"])


def test_eps_objective_resumes_exactly(tmp_path):
    eps = [*TINY, "--objective", "eps", "--steps", "4", "--checkpoint-every", "2"]
    train.main([*eps, "--out", str(tmp_path / "whole")])
    train.main([*eps, "--out", str(tmp_path / "split"), "--stop-after", "2"])
    train.main([*eps, "--out", str(tmp_path / "split")])
    whole, split = (read_checkpoint(tmp_path / name / "latest.pt") for name in ("whole", "split"))
    assert_same_state(split["model"], whole["model"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and losses[0] == pytest.approx(1.5, rel=0.05)  # zero init: E eps^2 (1 + 0.5)


def test_trains_on_latent_shards(tmp_path):
    """The ImageNet configs' path: SD-VAE latent shards, (4, S/8, S/8) per item, 2 shards."""
    generator = np.random.default_rng(0)
    for shard in range(2):
        np.save(tmp_path / f"latents_{shard:05d}.npy", generator.standard_normal((6, 4, 4, 4)).astype(np.float16))
        np.save(tmp_path / f"labels_{shard:05d}.npy", generator.integers(0, 10, 6))
    train.main(["--config", "sit-b2-imagenet", "--data-path", str(tmp_path), "--image-size", "32", "--num-classes",
                "10", "--depth", "2", "--intermediate-block", "1", "--hidden-size", "32", "--num-heads", "4",
                "--batch-size", "4", "--steps", "2", "--workers", "0", "--out", str(tmp_path / "run")])
    checkpoint = read_checkpoint(tmp_path / "run" / "latest.pt")
    assert checkpoint["step"] == 2 and checkpoint["model"]["x_embedder.proj.weight"].shape == (32, 4, 2, 2)


# Run train.py with torch.save replaced by one that, on its second call (the checkpoint after step 4), writes half
# the bytes and kills the process on the spot (no cleanup, as SIGKILL).
DYING_SAVE = """
import io, os, sys, torch
real_save, calls = torch.save, []
def dying_save(obj, file):
    calls.append(1)
    if len(calls) < 2:
        return real_save(obj, file)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    file.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    file.flush()
    os._exit(9)
torch.save = dying_save
import train
train.main(sys.argv[1:])
"""


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(uninterrupted, tmp_path):
    result = run_script("-c", DYING_SAVE, *TINY, *STEPS, "--out", tmp_path)
    assert result.returncode == 9
    assert (tmp_path / "latest.pt.tmp").stat().st_size > 0  # the kill came mid-write
    assert read_checkpoint(tmp_path / "latest.pt")["step"] == 2  # the previous checkpoint, whole
    train.main([*TINY, *STEPS, "--out", str(tmp_path)])  # rerun: resumes from step 2 and finishes
    assert not (tmp_path / "latest.pt.tmp").exists()
    assert_same_state(read_checkpoint(tmp_path / "latest.pt")["model"], uninterrupted[0]["model"])


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: exit status 2, the message without a traceback, nothing written
# ---------------------------------------------------------------------------------------------------------------------

def make_bad_input(case, root):
    """-> (extra flags, text the message must contain)."""
    if case == "missing folder":
        return ["--data", "images", "--data-path", str(root / "nowhere")], "does not exist"
    if case == "empty folder":
        (root / "images").mkdir()
        return ["--data", "images", "--data-path", str(root / "images")], "is empty"
    if case == "non-image file":
        (root / "images" / "cat").mkdir(parents=True)
        (root / "images" / "cat" / "notes.txt").write_text("not an image")
        return ["--data", "images", "--data-path", str(root / "images")], "notes.txt is not an image file"
    if case == "latents of the wrong shape":  # 32 px images have (4, 4, 4) latents
        np.save(root / "latents_00000.npy", np.zeros((3, 4, 8, 8), np.float32))
        np.save(root / "labels_00000.npy", np.zeros(3, np.int64))
        return ["--data", "latents", "--data-path", str(root)], "latents_00000.npy: expected shape (N, 4, 4, 4)"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "non-image file", "latents of the wrong shape"])
def test_bad_data_exits_2_with_the_message_and_writes_nothing(case, tmp_path, capsys):
    flags, message = make_bad_input(case, tmp_path)
    error = train_error([*TINY, *flags, "--out", tmp_path / "run"], capsys)
    assert error.startswith("error: ") and message in error and "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_undecodable_image_stops_the_run_with_the_message(tmp_path, capsys):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "broken.png").write_bytes(b"not a png")
    error = train_error([*TINY, "--data", "images", "--data-path", tmp_path / "images", "--out", tmp_path / "run"],
                        capsys)
    assert error.startswith("error: cannot read image") and "broken.png" in error
    assert not (tmp_path / "run" / "latest.pt").exists()  # the log exists; no checkpoint of a step never taken


def test_resuming_with_another_model_is_refused(uninterrupted, tmp_path, capsys):
    _, out = uninterrupted
    before = {path.name: file_digest(path) for path in out.iterdir()}
    error = train_error([*TINY, *STEPS, "--hidden-size", "64", "--out", out], capsys)
    assert "different run" in error and "hidden_size: stored 32, given 64" in error
    assert {path.name: file_digest(path) for path in out.iterdir()} == before


def test_command_line_error_is_a_message_not_a_traceback(tmp_path):
    result = run_script("train.py", *TINY, "--data", "images", "--data-path", tmp_path / "nowhere",
                        "--out", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.startswith("error: image folder") and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Configs and FLOPs
# ---------------------------------------------------------------------------------------------------------------------

def test_imagenet_configs_are_the_sit_presets():
    for name, preset, block in (("sit-b2-imagenet", "DiT-B/2", 4), ("sit-xl2-imagenet", "DiT-XL/2", 8)):
        with torch.device("meta"):
            ours = jobs.DiTJob(training.CONFIGS[name]).build()
            theirs = MODELS[preset](intermediate_block=block)
        shapes = [{key: value.shape for key, value in model.state_dict().items()} for model in (ours, theirs)]
        assert shapes[0] == shapes[1]
        assert ours.intermediate_block == block and count_parameters(ours) == count_parameters(theirs)


def test_training_flops_match_the_closed_form():
    """Forward: every matmul 2 m n k. Backward: twice that, except where the input needs no gradient (the patch
    convolution and the first timestep-MLP layer: weight gradient only), so the total is 3 F - F_patch - F_tmlp."""
    config = dict(training.CONFIGS["shapes-tiny"], depth=2, hidden_size=32, num_heads=4, patch_size=4)
    width, tokens, patch, channels, depth = 32, (32 // 4) ** 2, 4, 3, 2
    block = (2 * tokens * width * 3 * width + 2 * tokens * width * width + 2 * 2 * tokens * width * 4 * width
             + 2 * 2 * tokens * tokens * width + 2 * width * 6 * width)  # qkv, proj, MLP, QK^T and AV, adaLN
    head = 2 * width * 2 * width + 2 * tokens * width * patch * patch * channels  # final layer (twice: IG head)
    patch_embed, timestep_mlp = 2 * tokens * channels * patch * patch * width, 2 * 256 * width
    forward = depth * block + 2 * head + patch_embed + timestep_mlp + 2 * width * width
    dataset = jobs.make_job(config).make_dataset()
    assert training.training_flops_per_image(config, dataset) == 3 * forward - patch_embed - timestep_mlp
