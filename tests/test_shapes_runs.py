"""The testbed's named configs: shapes-one-object and the pipeline's base UNet and ControlNet train (their own data,
model and optimiser settings, a smaller batch) and their loss falls on fresh scenes; pipeline runs from before the
scenes had a size of their own read as the old scenes."""
import json
import os

import numpy as np
import pytest
import torch

import train
from ref.losses import ddpm_timesteps
from ref.runtime import SampleDraws
from shapes import guidance_sweep
from shapes.classifier import save_classifier, train_classifier
from shapes.data import MAX_OBJECTS
from shapes.evaluation import evaluation_scenes
from shapes.pipeline import CAPTION_TOKENIZER, drop_captions
from shapes.runs import SHAPES_CONFIGS, load_trained, make_run

torch.set_num_threads(1)


def short_run(config, folder, steps, *flags):
    """train.py --config CONFIG for `steps` steps of 8 fresh scenes, every loss logged, into folder."""
    train.main(["--config", config, "--batch-size", "8", "--steps", str(steps), "--checkpoint-every", str(steps),
                "--log-every", "1", "--out", str(folder), *flags])
    return folder


@pytest.fixture(scope="module")
def one_object_run(tmp_path_factory):
    """The shapes-one-object preset, 60 steps, the lr decaying over the last 30% as the preset's."""
    return short_run("shapes-one-object", tmp_path_factory.mktemp("one-object"), 60, "--lr-decay-steps", "18")


def test_shapes_one_object_trains_and_its_loss_falls(one_object_run):
    """60 steps of 8 new single-object scenes each (no scene repeats): the last 10 logged losses average below 0.6 x
    the first step's (measured: 1.98 -> 0.30, the mean of steps 51-60; a zero-initialised output starts at
    1.5 E||eps - x0||^2 with the IG term)."""
    preset = SHAPES_CONFIGS["shapes-one-object"]
    losses, config = logged(one_object_run)
    assert len(losses) == 60 and np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.6 * losses[0]
    assert config["shapes_max_objects"] == preset["shapes_max_objects"] == 1


def test_guidance_sweep_chooses_on_one_seed_set_and_reports_on_others(one_object_run, tmp_path):
    """--quick: every family's choice is its lowest FD on the selection seeds; the report rows are the held-out
    seeds' own samples (unguided = IG w 1), at the NFE each costs; the files are written; a rerun samples again only
    after the run was trained further."""
    classifier = tmp_path / "classifier.pt"
    save_classifier(train_classifier(SHAPES_CONFIGS["shapes-one-object"]["image_size"], steps=2), classifier)
    flags = [str(one_object_run), "--classifier", str(classifier), "--quick", "--report-seeds", "7", "9", "--out",
             str(tmp_path / "sweep")]
    report = guidance_sweep.main(flags)
    for family, rows in report["selection"].items():
        assert report["chosen"][family] == min(rows, key=lambda row: row["fd_shapes"])
        assert {row["seed"] for row in rows} == {0}
    unguided, ig, cfg, ig_cfg = report["table"].values()
    assert [row["seed"] for row in unguided] == [7, 9] and {row["ig"] for row in unguided} == {1.0}
    assert [row["nfe"] for row in unguided + ig] == [2] * 4 and [row["nfe"] for row in cfg + ig_cfg] == [4] * 4
    assert unguided[0]["fd_shapes"] != unguided[1]["fd_shapes"]  # different samples
    assert {path.name for path in (tmp_path / "sweep").iterdir() if path.is_file()} == {"sweep.json", "table.md",
                                                                                       "guidance.png"}
    # a rerun scores the samples it has; after the run is trained further (its checkpoint rewritten) it draws them anew
    drawn = {path: path.stat().st_mtime_ns for path in (tmp_path / "sweep").rglob("samples.npz")}
    assert guidance_sweep.main(flags)["table"] == report["table"]
    assert drawn == {path: path.stat().st_mtime_ns for path in drawn}
    checkpoint = one_object_run / "latest.pt"
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, max(drawn.values()) + 10**9))
    guidance_sweep.main(flags)
    assert all(path.stat().st_mtime_ns != stamp for path, stamp in drawn.items())


def logged(folder):
    """(losses, config) of a finished train.py run folder."""
    losses = [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return losses, json.loads((folder / "log.txt").read_text().split("config ", 1)[1].splitlines()[0])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The shapes-unet preset (16 px scenes of one object), 80 steps."""
    return short_run("shapes-unet", tmp_path_factory.mktemp("unet"), 80)


def test_the_pipeline_base_trains_on_its_scenes_and_its_loss_falls(base_run):
    """The eps loss of the last 10 steps averages below 0.6 x that of the first 10 (E||eps||^2 = 1 at the start)."""
    losses, config = logged(base_run)
    assert len(losses) == 80 and np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    assert (config["image_size"], config["shapes_max_objects"]) == (16, 1)
    assert make_run(config).make_dataset().max_objects == 1


def test_the_pipeline_controlnet_trains_and_its_loss_falls(base_run, tmp_path):
    """The shapes-controlnet preset on that base: the diffusion loss of its last 20 of 120 steps averages below that of
    its first 20 (the zero convolutions start it at the base's loss; the control then tells where the object is)."""
    short_run("shapes-controlnet", tmp_path, 120, "--base", str(base_run / "latest.pt"))
    losses, config = logged(tmp_path)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    assert (config["image_size"], config["shapes_max_objects"]) == (16, 1)


def test_the_base_draws_its_t_from_its_t_distribution(base_run):
    """The base UNet's loss sees t ~ U{0..T-1} (as before the field: the same draws) or, with --t-distribution
    logit-normal, the binned logit-normal t of ref.losses.ddpm_timesteps, drawn after the caption dropout."""
    _, config = logged(base_run)
    images, tokens = torch.zeros(4, 3, 16, 16), torch.zeros(4, CAPTION_TOKENIZER.max_length, dtype=torch.long)
    for distribution, location in (("uniform", 0.0), ("logit-normal", 0.0), ("logit-normal", 1.0)):
        run, seen = make_run(dict(config, t_distribution=distribution, t_location=location)), []
        run.loss(lambda x_t, t, tokens: seen.append(t) or x_t, (images, tokens), SampleDraws(range(4)),
                 torch.device("cpu"))
        draws = SampleDraws(range(4))
        drop_captions(tokens, config["label_dropout"], draws)
        torch.testing.assert_close(seen[0], ddpm_timesteps(draws, 1000, distribution, location), rtol=0, atol=0)
    assert config["t_distribution"] == "uniform"


def test_a_pipeline_run_from_before_max_objects_reads_as_three_objects(base_run, tmp_path):
    """A checkpoint written before the fields (no shapes_max_objects, t_distribution, t_location in its config) loads
    with the old scenes, up to MAX_OBJECTS a scene, and t ~ U{0..T-1}; its evaluation scenes are those."""
    checkpoint = torch.load(base_run / "latest.pt", weights_only=False)
    for field in ("shapes_max_objects", "t_distribution", "t_location"):
        del checkpoint["args"][field]
    del checkpoint["digests"]  # a checkpoint that old stored no digests either
    torch.save(checkpoint, tmp_path / "old.pt")
    _, config = load_trained(tmp_path / "old.pt", "unet")
    assert config["shapes_max_objects"] == MAX_OBJECTS
    assert (config["t_distribution"], config["t_location"]) == ("uniform", 0.0)
    assert evaluation_scenes(config, 4).max_objects == MAX_OBJECTS
    _, config = load_trained(base_run / "latest.pt", "unet")
    assert evaluation_scenes(config, 4).max_objects == 1
