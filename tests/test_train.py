"""train.py: the loss falls when one small batch is overfitted (flow and eps objectives); two ranks stay bitwise in step
(and match one rank up to the order of gradient sums), a killed-and-resumed run is bitwise the uninterrupted one, its
numbered snapshots included (flow and eps objectives; loader workers and gradient checkpointing change nothing); a
snapshot samples as the run at its step; a kill during a checkpoint write leaves the previous checkpoint; bad input
(data, counts below 1, files that are not checkpoints) exits 2 with one message and writes nothing; latent shards train
on the scaled latents and their labels; the FLOP count behind MFU against the closed form; the ImageNet configs are the
SiT presets."""
import hashlib
import json
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from ref import internal_guidance, runtime
from ref.checkpoints import read_checkpoint
from ref.configs import CONFIGS
from ref.data import SD_VAE_SCALE_FACTOR, batch_indices
from ref.dit import MODELS, count_parameters
from ref.internal_guidance import DiTRun
from ref.trainer import training_flops_per_image
from shapes import runs
from shapes.runs import SHAPES_CONFIGS
from tests.helpers import assert_same_state, train_error

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
TINY = ["--config", "shapes-tiny", "--depth", "2", "--hidden-size", "32", "--batch-size", "8", "--lr", "1e-3",
        "--log-every", "1"]
STEPS = ["--steps", "6", "--checkpoint-every", "2"]
# Counted in images: at batch 8 the run passes 20 and 40 images at steps 3 (24 seen) and 5 (40 seen), neither of them
# a checkpoint step of STEPS.
SNAPSHOTS = ["--snapshot-every", "20"]
SNAPSHOT_STEPS = {"snapshot-000000024.pt": 3, "snapshot-000000040.pt": 5}


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def logged_losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def snapshots(out):
    return {path.name: read_checkpoint(path) for path in sorted(Path(out).glob("snapshot-*.pt"))}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 6 steps in one go, with snapshots."""
    out = tmp_path_factory.mktemp("uninterrupted")
    train.main([*TINY, *STEPS, *SNAPSHOTS, "--out", str(out)])
    return read_checkpoint(out / "latest.pt"), out


def test_two_ranks_end_with_identical_weights(uninterrupted, tmp_path):
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        *TINY, *STEPS, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    digests = dict(re.findall(r"rank (\d): weights sha256 (\w+)", result.stdout))
    assert sorted(digests) == ["0", "1"] and digests["0"] == digests["1"]
    checkpoint = read_checkpoint(tmp_path / "latest.pt")
    assert runtime.weights_digest(checkpoint["model"]) == digests["0"]
    # The per-sample draws do not depend on the number of ranks: the first loss (before any update) is the
    # single-process one, and after 6 steps the weights differ only by the order of the gradient sums.
    single, single_out = uninterrupted
    losses = [logged_losses(out) for out in (tmp_path, single_out)]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-6)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)  # every step's loss, not only the first
    for key, value in single["model"].items():
        torch.testing.assert_close(checkpoint["model"][key], value, atol=1e-6, rtol=1e-5)


def test_killed_and_resumed_run_is_bitwise_the_uninterrupted_one(uninterrupted, tmp_path):
    train.main([*TINY, *STEPS, *SNAPSHOTS, "--out", str(tmp_path), "--stop-after", "3"])  # as if killed after step 3
    assert read_checkpoint(tmp_path / "latest.pt")["step"] == 3
    # The same command resumes; a changed snapshot cadence is accepted (every 40 images: step 5 again here).
    train.main([*TINY, *STEPS, "--snapshot-every", "40", "--out", str(tmp_path)])
    resumed, (reference, reference_out) = read_checkpoint(tmp_path / "latest.pt"), uninterrupted
    assert resumed["step"] == 6
    for part in ("model", "ema", "opt"):
        assert_same_state(resumed[part], reference[part])
    resumed_snapshots, reference_snapshots = snapshots(tmp_path), snapshots(reference_out)
    assert sorted(resumed_snapshots) == sorted(reference_snapshots) == sorted(SNAPSHOT_STEPS)
    for name, step in SNAPSHOT_STEPS.items():
        assert resumed_snapshots[name]["step"] == reference_snapshots[name]["step"] == step
        for part in ("model", "ema", "opt"):
            assert_same_state(resumed_snapshots[name][part], reference_snapshots[name][part])
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "resumed at step 3" in (tmp_path / "log.txt").read_text()


def test_a_snapshot_samples_as_the_run_stopped_at_its_step(uninterrupted, tmp_path):
    """sample.py takes a snapshot file; its samples are those of a run stopped after the snapshot's step (3) and
    differ from the final weights'; by default they go to their own folder beside the snapshot."""
    _, out = uninterrupted
    train.main([*TINY, *STEPS, "--out", str(tmp_path / "run"), "--stop-after", "3"])
    snapshot = tmp_path / "snapshot-000000024.pt"  # a copy, so that the reference run's folder stays as it was
    snapshot.write_bytes((out / snapshot.name).read_bytes())
    assert_same_state(read_checkpoint(tmp_path / "run" / "latest.pt")["ema"], read_checkpoint(snapshot)["ema"])
    flags = ["--num-samples", "3", "--sampler", "heun", "--steps", "2"]
    sample.main([str(snapshot), *flags])
    sample.main([str(tmp_path / "run"), *flags, "--out", str(tmp_path / "stopped")])
    sample.main([str(out), *flags, "--out", str(tmp_path / "final")])
    folder = tmp_path / "samples-snapshot-000000024-heun2-ig1-cfg1-seed0-n3"
    from_snapshot, stopped, final = (np.load(path / "samples.npz")["arr_0"]
                                     for path in (folder, tmp_path / "stopped", tmp_path / "final"))
    assert np.array_equal(from_snapshot, stopped) and not np.array_equal(from_snapshot, final)
    assert json.loads((folder / "settings.json").read_text())["step"] == 3


def test_loader_workers_and_gradient_checkpointing_do_not_change_the_run(uninterrupted, tmp_path):
    train.main([*TINY, *STEPS, "--out", str(tmp_path), "--workers", "2", "--gradient-checkpointing"])
    assert_same_state(read_checkpoint(tmp_path / "latest.pt")["model"], uninterrupted[0]["model"])


@pytest.mark.parametrize("objective", ["flow", "eps"])
def test_the_loss_falls_when_one_small_batch_is_overfitted(objective, tmp_path):
    """The 8 scenes of an 8-item dataset at batch 8 (each step a new t and noise for them), no label dropout: after 60
    steps the mean logged loss of the last 20 is below 0.6 x the first step's (measured: flow 2.02 -> ~1.0, eps
    1.52 -> ~0.65; a zero-initialised output starts at 1.5 E||target||^2 with the IG term)."""
    train.main([*TINY, "--objective", objective, "--shapes-items", "8", "--label-dropout", "0", "--lr", "1e-2",
                "--steps", "60", "--checkpoint-every", "60", "--out", str(tmp_path)])
    losses = logged_losses(tmp_path)
    assert len(losses) == 60 and np.all(np.isfinite(losses))
    assert np.mean(losses[-20:]) < 0.6 * losses[0]


def test_eps_objective_resumes_exactly(tmp_path):
    eps = [*TINY, "--objective", "eps", "--steps", "4", "--checkpoint-every", "2"]
    train.main([*eps, "--out", str(tmp_path / "whole")])
    train.main([*eps, "--out", str(tmp_path / "split"), "--stop-after", "2"])
    train.main([*eps, "--out", str(tmp_path / "split")])
    whole, split = (read_checkpoint(tmp_path / name / "latest.pt") for name in ("whole", "split"))
    assert_same_state(split["model"], whole["model"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and losses[0] == pytest.approx(1.5, rel=0.05)  # zero init: E eps^2 (1 + 0.5)


def test_trains_on_latent_shards(tmp_path, monkeypatch):
    """The ImageNet configs' path: SD-VAE latent shards, (4, S/8, S/8) per item, 2 shards. The loss gets the stored
    latents of each step's items times the SD-VAE scale factor, the network their stored labels (no label dropout
    here), and the loss falls (measured: 1.62 at the first step, a mean of 0.64 over the last 20 of 40)."""
    generator = np.random.default_rng(0)
    latents, labels = generator.standard_normal((12, 4, 4, 4)).astype(np.float16), generator.integers(0, 10, 12)
    for shard in range(2):
        np.save(tmp_path / f"latents_{shard:05d}.npy", latents[6 * shard:6 * (shard + 1)])
        np.save(tmp_path / f"labels_{shard:05d}.npy", labels[6 * shard:6 * (shard + 1)])
    seen = []  # (x0 given to the loss, labels given to the network) of every training step
    real_loss = internal_guidance.flow_matching_loss

    def recording_loss(model, x0, t, y, eps, *options):
        if x0.device.type == "meta":  # the FLOP count
            return real_loss(model, x0, t, y, eps, *options)

        def network(x_t, t, y_seen):
            seen.append((x0.clone(), y_seen.clone()))
            return model(x_t, t, y_seen)
        return real_loss(network, x0, t, y, eps, *options)

    monkeypatch.setattr(internal_guidance, "flow_matching_loss", recording_loss)
    train.main(["--config", "sit-b2-imagenet", "--data-path", str(tmp_path), "--image-size", "32", "--num-classes",
                "10", "--depth", "2", "--intermediate-block", "1", "--hidden-size", "32", "--num-heads", "4",
                "--batch-size", "4", "--steps", "40", "--lr", "1e-2", "--label-dropout", "0", "--log-every", "1",
                "--workers", "0", "--out", str(tmp_path / "run")])
    checkpoint = read_checkpoint(tmp_path / "run" / "latest.pt")
    assert checkpoint["step"] == 40 and checkpoint["model"]["x_embedder.proj.weight"].shape == (32, 4, 2, 2)
    assert len(seen) == 40
    for step, (x0, y_seen) in enumerate(seen):
        items = batch_indices(step, 4, 0, 1, 0, 12)
        assert torch.equal(x0, torch.from_numpy(latents[items].astype(np.float32)) * SD_VAE_SCALE_FACTOR)
        assert torch.equal(y_seen, torch.from_numpy(labels[items]))
    losses = logged_losses(tmp_path / "run")
    assert np.all(np.isfinite(losses)) and np.mean(losses[-20:]) < 0.6 * losses[0]


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


@pytest.mark.parametrize("flags", [["--steps", "-5"], ["--steps", "0"], ["--batch-size", "0"], ["--log-every", "0"],
                                   ["--checkpoint-every", "-1"], ["--snapshot-every", "0"], ["--stop-after", "0"]])
def test_a_count_below_one_is_a_usage_error(flags, tmp_path, capsys):
    error = train_error([*TINY, *flags, "--out", tmp_path / "run"], capsys)
    assert error == f"error: {flags[0]} must be positive, got {flags[1]}\n"
    assert not (tmp_path / "run").exists()


def write_not_checkpoints(root):
    """Files that are not checkpoints train.py can read -> {path: what the message must say (its parts in torch's
    words kept short: they may vary between torch versions)}."""
    (root / "notes.pt").write_text("weights: see the paper\n")
    (root / "empty.pt").write_bytes(b"")
    torch.save({"model": {"w": torch.zeros(64, 64)}}, root / "whole.pt")
    (root / "truncated.pt").write_bytes((root / "whole.pt").read_bytes()[:3000])
    torch.save({"model": {}, "lr": Fraction(1, 3)}, root / "object.pt")  # a global a weights-only load refuses
    return {root / "notes.pt": "is not a PyTorch checkpoint (neither a zip archive nor a pickle; its first bytes are "
                               "b'weights:'); expected a file written by train.py or torch.save",
            root / "empty.pt": "is empty; expected a file written by train.py or torch.save",
            root / "truncated.pt": ["is a zip archive that torch.load cannot read (", "central directory",
                                    "): a checkpoint cut short or damaged"],
            root / "object.pt": ["holds objects a weights-only load refuses (", "fractions.Fraction"]}


def test_a_file_that_is_not_a_checkpoint_is_named_without_unsafe_advice(tmp_path, capsys):
    """read_checkpoint says what the file is not and what was expected, and never suggests weights_only=False; so do
    sample.py FILE and train.py's partner runs (here the probe's --base)."""
    for path, parts in write_not_checkpoints(tmp_path).items():
        parts = [parts] if isinstance(parts, str) else parts
        with pytest.raises(ValueError) as error_info:
            read_checkpoint(path)
        assert str(error_info.value).startswith(f"{path} {parts[0]}") and "weights_only" not in str(error_info.value)
        with pytest.raises(SystemExit) as exit_info:
            sample.main([str(path), "--out", str(tmp_path / "samples")])
        errors = [capsys.readouterr().err]
        assert exit_info.value.code == 2
        errors.append(train_error(["--config", "shapes-probe", "--base", path, "--out", tmp_path / "run"], capsys))
        for error in [str(error_info.value) + "\n", *errors]:
            assert error.count("\n") == 1 and all(part in error for part in parts) and "weights_only" not in error
    assert not (tmp_path / "samples").exists() and not (tmp_path / "run").exists()


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
    for name, preset, block in (("sit-b2-imagenet", "SiT-B/2", 4), ("sit-xl2-imagenet", "SiT-XL/2", 8)):
        with torch.device("meta"):
            ours = DiTRun(CONFIGS[name]).build()
            theirs = MODELS[preset](intermediate_block=block)
        shapes = [{key: value.shape for key, value in model.state_dict().items()} for model in (ours, theirs)]
        assert shapes[0] == shapes[1]
        assert ours.intermediate_block == block and count_parameters(ours) == count_parameters(theirs)


def test_training_flops_match_the_closed_form():
    """Forward: every matmul 2 m n k. Backward: twice that, except where the input needs no gradient (the patch
    convolution and the first timestep-MLP layer: weight gradient only), so the total is 3 F - F_patch - F_tmlp."""
    config = dict(SHAPES_CONFIGS["shapes-tiny"], depth=2, hidden_size=32, num_heads=4, patch_size=4)
    width, tokens, patch, channels, depth = 32, (32 // 4) ** 2, 4, 3, 2
    block = (2 * tokens * width * 3 * width + 2 * tokens * width * width + 2 * 2 * tokens * width * 4 * width
             + 2 * 2 * tokens * tokens * width + 2 * width * 6 * width)  # qkv, proj, MLP, QK^T and AV, adaLN
    head = 2 * width * 2 * width + 2 * tokens * width * patch * patch * channels  # final layer (twice: IG head)
    patch_embed, timestep_mlp = 2 * tokens * channels * patch * patch * width, 2 * 256 * width
    forward = depth * block + 2 * head + patch_embed + timestep_mlp + 2 * width * width
    dataset = runs.make_run(config).make_dataset()
    assert training_flops_per_image(runs.make_run, config, dataset) == 3 * forward - patch_embed - timestep_mlp


def test_each_kind_of_run_has_its_own_fields_and_help(capsys):
    """A DiT run carries no InnerControl field, a ControlNet run no DiT field; --help lists the chosen kind's fields
    only, and a flag of another kind is refused."""
    dit, _ = train.parse_args(["--config", "shapes-tiny"])
    controlnet, _ = train.parse_args(["--config", "shapes-controlnet"])
    assert "patch_size" in dit and "reward_range" not in dit and "task" not in dit
    assert "reward_range" in controlnet and "patch_size" not in controlnet and "objective" not in controlnet
    imagenet, _ = train.parse_args(["--config", "sit-b2-imagenet"])
    assert set(imagenet) == set(dit) - {"shapes_items", "shapes_max_objects"}
    for config, present, absent in (("shapes-controlnet", "--reward-range", "--patch-size"),
                                    ("shapes-tiny", "--patch-size", "--reward-range")):
        with pytest.raises(SystemExit):
            train.parse_args(["--config", config, "--help"])
        help_text = capsys.readouterr().out
        assert present in help_text and absent not in help_text
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args(["--config", config, absent, "1"])
        assert exit_info.value.code == 2 and f"unrecognized arguments: {absent}" in capsys.readouterr().err


def test_a_small_cpu_run_takes_one_thread_unless_omp_num_threads_is_set(tmp_path, monkeypatch):
    """Threads (README): without OMP_NUM_THREADS a small config on the CPU trains on one thread per process, and says
    so; with it set, the thread count is the user's."""
    for omp, expected in ((None, 1), ("2", 2)):
        if omp is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", omp)
        torch.set_num_threads(2)
        try:
            train.main([*TINY, "--steps", "1", "--out", str(tmp_path / str(omp))])
            assert torch.get_num_threads() == expected
        finally:
            torch.set_num_threads(1)
        said = "1 thread per process: " in (tmp_path / str(omp) / "log.txt").read_text()
        assert said == (omp is None)


def test_compiled_run_trains_as_the_eager_one(tmp_path, monkeypatch):
    """--compile wraps the model in torch.compile (before any DDP wrap) and the run trains and checkpoints as the eager
    one: on an 8-item overfit the loss falls and the weights after 20 steps equal the eager run's (measured: bitwise).
    The backend here is aot_eager (dynamo's graph capture and AOT autograd, without code generation): inductor, the
    default, took 244 s to compile this tiny model's step on 2 CPU cores beside other jobs (eager: 4 s for the run)."""
    compiled_models = []

    def compile_for_the_test(model, **options):
        compiled_models.append(model)
        return torch_compile(model, backend="aot_eager", **options)

    torch_compile = torch.compile
    monkeypatch.setattr(torch, "compile", compile_for_the_test)
    overfit = [*TINY, "--shapes-items", "8", "--label-dropout", "0", "--lr", "1e-2", "--steps", "20",
               "--checkpoint-every", "20"]
    train.main([*overfit, "--compile", "--out", str(tmp_path / "compiled")])
    assert len(compiled_models) == 1
    train.main([*overfit, "--out", str(tmp_path / "eager")])
    assert len(compiled_models) == 1
    losses = logged_losses(tmp_path / "compiled")
    assert np.mean(losses[-5:]) < 0.8 * losses[0]
    compiled, eager = (read_checkpoint(tmp_path / run / "latest.pt")["model"] for run in ("compiled", "eager"))
    assert compiled.keys() == eager.keys()
    for key in eager:
        assert torch.allclose(compiled[key], eager[key], atol=1e-5), key
