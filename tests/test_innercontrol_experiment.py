"""shapes/experiment.py --quick: every stage, every Table 2 row, sampling, scoring and both figures run through
the real scripts on toy budgets; the table has the paper's rows and the figures' measurement covers t in [0, 999]; each
row's Eq. 8 terms change what its ControlNet learns from the same start, data and draws; chosen rows trained longer
land beside the others; a rerun samples again only what was trained since; the 30-minute sizes reach each stage."""
import json
import os

import numpy as np
import torch
from PIL import Image

import train
from ref.checkpoints import read_checkpoint
from ref.control_evaluation import ControlScore
from shapes import experiment
from shapes.runs import SHAPES_CONFIGS

torch.set_num_threads(1)


def test_quick_run_writes_the_table_and_figures(tmp_path):
    report = experiment.main(["--quick", "--out", str(tmp_path)])
    folder = tmp_path / "depth"
    assert list(report["table"]) == ["real images", experiment.BASE_ALONE, *experiment.DEPTH_ROWS]
    base_alone = json.loads((folder / "samples" / "base-alone-seed1" / "settings.json").read_text())
    assert (base_alone["controlnet"], base_alone["seed"], base_alone["config"]["task"]) == (None, 1000, "depth")
    for row in report["table"].values():
        assert 0 <= row["rmse"] <= 255 and np.isfinite(row["fd_shapes"])
    assert [row["t"] for row in report["errors_across_t"]] == experiment.FIG2_TIMESTEPS
    for row in report["errors_across_t"]:  # Fig. 2: the mean over the noise seeds, each seed's kept
        for reader in ("probe", "reward"):
            per_seed = [seed_row["rmse"] for seed_row in row[f"{reader}_per_seed"]]
            assert len(per_seed) == experiment.BUDGETS["quick"]["seeds"]
            assert row[reader]["rmse"] == np.mean(per_seed)
    assert row["reward_per_seed"][0] != row["reward_per_seed"][1]  # another noise draw at t = 999
    assert json.loads((folder / "table.json").read_text())["task"] == "depth"
    assert 0 < report["training_seconds"] < report["seconds"]  # the stages and rows: a part of the whole
    assert (folder / "table.md").read_text().count("\n") == 2 + len(report["table"])
    for name in ("fig2.png", "fig3.png"):
        assert min(Image.open(folder / name).size) > 100
    # every row starts from the fine-tuned ControlNet and sees the same batches and draws: the plain row moved it, and
    # each row with a reward or alignment term ended somewhere else than the plain row (and than each other)
    start = read_checkpoint(folder / "controlnet" / "latest.pt")["model"]
    ends = [read_checkpoint(folder / "rows" / f"row{index}" / "latest.pt")["model"]
            for index in range(len(experiment.DEPTH_ROWS))]
    assert max(distance(start, ends[0]).values()) > 0
    for index, end in enumerate(ends[1:], start=1):
        moved = distance(ends[0], end)
        row = list(experiment.DEPTH_ROWS)[index]
        assert max(moved.values()) > 1e-6 * max(distance(start, ends[0]).values()), row
    assert max(distance(ends[2], ends[3]).values()) > 0  # reward [0, 200] and [0, 920]: the range matters
    # a rerun finds every run finished and every sample folder written: nothing is trained or sampled again
    stamps = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.pt")}
    drawn = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("samples.npz")
             if path.parent.name != "real"}  # the real scenes' images: rendered again, not sampled
    experiment.main(["--quick", "--out", str(tmp_path)])
    assert stamps == {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*.pt")}
    assert drawn == {path: path.stat().st_mtime_ns for path in drawn}
    # a row trained further since its samples were drawn (its checkpoint rewritten): its samples alone drawn again
    row4 = folder / "rows" / "row4" / "latest.pt"
    os.utime(row4, ns=(row4.stat().st_atime_ns, max(drawn.values()) + 10**9))
    stamps[row4] = row4.stat().st_mtime_ns
    experiment.main(["--quick", "--out", str(tmp_path)])
    redrawn = {path for path in drawn if path.stat().st_mtime_ns != drawn[path]}
    assert {path.parent.name for path in redrawn} == {"row4-seed0", "row4-seed1"}
    # two rows trained longer: their own runs, samples and table; the stages and the other rows' runs untouched
    report = experiment.main(["--quick", "--out", str(tmp_path), "--rows", "0,4", "--row-steps", "3"])
    names = list(experiment.DEPTH_ROWS)
    assert list(report["table"]) == ["real images", experiment.BASE_ALONE, names[0], names[4]]
    assert [read_checkpoint(folder / "rows-3steps" / f"row{index}" / "latest.pt")["step"] for index in (0, 4)] == [3, 3]
    assert (folder / "samples" / "row4-3steps-seed1" / "samples.npz").exists()
    assert json.loads((folder / "table-rows0-4-3steps.json").read_text())["row_steps"] == 3
    assert stamps == {path: path.stat().st_mtime_ns for path in stamps}


def test_the_thirty_minute_sizes_reach_each_stages_training(monkeypatch, tmp_path):
    """--thirty-minutes: every stage and the Eq. 8 row (alone) get the 30-minute flags and the seed, as train.py
    reads them (launches recorded, nothing trained), --row-steps the row's steps in their place; the full budget
    leaves the configs' own sizes."""
    launched = {}  # {config: the train.py flags}
    monkeypatch.setattr(experiment, "launch",
                        lambda script, flags, nproc: launched.update({flags[1]: list(map(str, flags))}))
    monkeypatch.setattr(experiment, "evaluate_rows", lambda *args: {})
    monkeypatch.setattr(experiment, "figure_rows", lambda *args: ([[]], None, None))
    monkeypatch.setattr(experiment, "write_figures", lambda *args: None)
    classifier = tmp_path / "classifier.pt"
    classifier.touch()
    for folder in (tmp_path / "depth", tmp_path / "full" / "depth"):  # where the stages would have written
        folder.mkdir(parents=True)
    experiment.main(["--thirty-minutes", "--seed", "2", "--out", str(tmp_path), "--classifier", str(classifier)])
    configs = {name: train.parse_args(flags)[0] for name, flags in launched.items()}
    assert set(configs) == {"shapes-unet", "shapes-estimator-reward", "shapes-estimator-eval", "shapes-probe",
                            "shapes-controlnet", "shapes-innercontrol"}
    base, controlnet, row = configs["shapes-unet"], configs["shapes-controlnet"], configs["shapes-innercontrol"]
    assert (base["steps"], base["lr_decay_steps"], base["ema_decay"], base["t_distribution"]) == (2000, 500, 0.998,
                                                                                                  "logit-normal")
    assert controlnet["steps"] == 500
    assert (row["batch_size"], row["steps"], row["lr"], row["lr_decay_steps"]) == (16, 3000, 1.2e-3, 2500)
    assert (row["reward_range"], row["align_range"]) == ([0, 200], [0, 920])  # the Eq. 8 row of Table 2
    assert str(tmp_path / "depth" / "rows-30min" / "row4") == str(launched["shapes-innercontrol"][-1])
    assert {name: config["seed"] for name, config in configs.items() if config["seed"] != 2} == {
        "shapes-estimator-eval": experiment.EVAL_ESTIMATOR_SEED}  # the yardstick: the same for every training seed
    assert (tmp_path / "depth" / "table-30min.json").exists()
    launched.clear()
    experiment.main(["--thirty-minutes", "--row-steps", "4000", "--out", str(tmp_path), "--classifier",
                     str(classifier)])
    row = train.parse_args(launched["shapes-innercontrol"])[0]
    assert (row["batch_size"], row["steps"], row["lr"], row["lr_decay_steps"]) == (16, 4000, 1.2e-3, 2500)
    assert str(tmp_path / "depth" / "rows-30min-4000steps" / "row4") == str(launched["shapes-innercontrol"][-1])
    launched.clear()
    experiment.main(["--out", str(tmp_path / "full"), "--classifier", str(classifier), "--rows", "4"])
    for name, config in ((name, train.parse_args(flags)[0]) for name, flags in launched.items()):
        assert config["steps"] == SHAPES_CONFIGS[name]["steps"] and config["seed"] == 0


def distance(state, other):
    """{name: max |difference|} over the floating-point tensors of two state dicts."""
    return {name: float((value - other[name]).abs().max()) for name, value in state.items()
            if value.is_floating_point()}


def test_control_scores_on_hand_cases():
    depth = torch.rand(2, 1, 8, 8)
    depth[:, :, 0, 0] = 0  # then min-max scaling (the control's) and max scaling (the estimate's) agree
    score = ControlScore("depth")
    score.update(depth, depth)
    assert score.result()["rmse"] < 1e-9  # the control min-max scaled equals the estimate max-scaled when min is 0
    segments = torch.tensor([[[0, 1], [2, 2]]])
    score = ControlScore("segmentation", 3)
    score.update(torch.nn.functional.one_hot(segments, 3).permute(0, 3, 1, 2).float(), segments)
    assert score.result()["miou"] == 1.0
    score = ControlScore("edges")
    edges = (torch.rand(1, 1, 16, 16) > 0.8).float()
    score.update(edges, edges)
    assert abs(score.result()["ssim"] - 1) < 1e-9
