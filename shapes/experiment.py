"""InnerControl on the shapes data, end to end: the pipeline's stages, the rows of the paper's Table 2, and the
analogs of its Fig. 2 (control error across t: probe on the decoder features vs reward model on the one-step
estimate) and Fig. 3 (one-step estimate, its reward-model reading, the probe's reading, across noise levels).

    python -m shapes.experiment [--task depth|segmentation|edges] [--nproc 2] [--out runs/innercontrol]
    python -m shapes.experiment --task depth --rows 0,4 --row-steps 2000   # two rows trained longer, same stages
    python -m shapes.experiment --task depth --thirty-minutes --out runs/innercontrol-30min   # the Eq. 8 row, ~30 min
    python -m shapes.experiment --quick          # seconds: every step on toy budgets (the tests run it)

Every stage is a train.py run in OUT (base UNet, reward and evaluation estimators, probe, fine-tuned ControlNet), each
Table 2 row a train.py run that continues from the fine-tuned ControlNet for the same number of steps with its Eq. 8
terms; rerunning the command resumes or skips what is done (samples are drawn again from a run trained since they were
written). --rows keeps only the rows numbered, --row-steps trains them for N steps instead (in OUT/TASK/rows-Nsteps);
either writes its own table-rows...-Nsteps.json beside table.json. --thirty-minutes trains every stage at the sizes of
the whole pipeline in ~30 minutes on 2 cores (BUDGETS["30min"]), the Eq. 8 row alone unless --rows (in
OUT/TASK/rows-30min, table-30min...json); --seed changes every run's training seed but the evaluation estimator's.
Each row is sampled by sample.py (DDIM with eta 1, caption CFG, the budget's sampling seeds over the same evaluation
scenes) and scored by eval.py innercontrol (the evaluation estimator's control metric; FD-shapes); "real images" scores
the evaluation scenes themselves (the estimator's floor), "base UNet alone" the base without a ControlNet on their
captions. Fig. 2 is measured once per sampling seed's noise draw and averaged. Writes OUT/<task>/table.json, table.md,
fig2.png, fig3.png. Training and sampling run under torchrun with --nproc ranks.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import eval as eval_script  # the script eval.py; named so the builtin eval stays unshadowed
import sample as sample_script
import train as train_script
from ref.arguments import check_arguments, writable_folder
from ref.control_evaluation import CONTROL_METRICS, errors_across_t, line_chart
from ref.data import to_uint8
from ref.schedules import DDPMSchedule
from ref.runtime import Distributed, exit_with_error
from shapes import pipeline, runs
from shapes import sampling as shapes_sampling
from shapes.classifier import render, save_classifier, train_classifier
from shapes.evaluation import EVAL_SCENE_SEED, evaluation_scenes
from shapes.runs import SHAPES_CONFIGS

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"train.py": train_script.main, "sample.py": sample_script.main}

# Table 2 (depth): each row continues from the fine-tuned ControlNet; None keeps the task's Table 4 value.
DEPTH_ROWS = {
    "fine-tuned ControlNet": dict(alpha=0, beta=0),
    "+ alignment [0, 920]": dict(alpha=0, align_range="0,920"),
    "+ reward [0, 200]": dict(beta=0, reward_range="0,200"),
    "+ reward [0, 920]": dict(beta=0, reward_range="0,920"),
    "+ reward [0, 200] + alignment [0, 920]": dict(reward_range="0,200", align_range="0,920"),
}
OTHER_ROWS = {"fine-tuned ControlNet": dict(alpha=0, beta=0), "Eq. 8 (Table 4 settings)": {}}
BASE_ALONE = "base UNet alone (caption only)"  # the table's row of the base without a ControlNet

# Sampling and evaluation sizes; "train" overrides every stage's steps and batch size (the full run keeps the
# configs' own, shapes/runs.py), "stages" the flags of the configs named; "tag" marks the rows' folders and the table.
# "full" is the documented CPU run (README).
BUDGETS = {
    "full": dict(train={}, stages={}, tag="", scenes=100, seeds=3, sample_steps=20, eta=1.0, cfg=3.0, ref_shapes=2000,
                 fig_scenes=64, classifier_steps=2000),
    "quick": dict(train=dict(steps=2, batch_size=4), stages={}, tag="", scenes=4, seeds=2, sample_steps=2, eta=1.0,
                  cfg=3.0, ref_shapes=8, fig_scenes=2, classifier_steps=2),
}
# The whole pipeline in ~30 minutes on 2 cores (issue 24; docs/testbed.md, "Depth in 30 minutes"): the base half as
# long, its t logit-normal and its lr lowered to 0 over the last quarter; the plain ControlNet 500 steps; the Eq. 8
# row at batch 16 (twice the steps at the same images a second) for 3,000 steps, its lr 1.2e-3 held for 500 and
# lowered to 0 over the last 2,500. Evaluated as the full run.
BUDGETS["30min"] = dict(BUDGETS["full"], tag="-30min", stages={
    "shapes-unet": dict(steps=2000, lr_decay_steps=500, ema_decay=0.998, t_distribution="logit-normal"),
    "shapes-controlnet": dict(steps=500),
    "shapes-innercontrol": dict(batch_size=16, steps=3000, lr=1.2e-3, lr_decay_steps=2500),
})
# The evaluation estimator is the yardstick, as the paper's fixed pretrained estimators: one training seed whatever
# --seed, so rows of every training seed are scored on the same scale.
EVAL_ESTIMATOR_SEED = 0
FIG2_TIMESTEPS = list(range(0, 1000, 50)) + [999]
SCENES = {field: SHAPES_CONFIGS["shapes-unet"][field] for field in ("image_size", "shapes_max_objects")}


def launch(script, flags, nproc):
    """SCRIPT's main(FLAGS) in this process, or SCRIPT under torchrun with nproc ranks of one thread each; a failure
    stops the experiment (finished runs are kept, so a rerun goes on from there)."""
    flags = list(map(str, flags))
    print(f"$ {script} {' '.join(flags)}", flush=True)
    if nproc == 1:
        return SCRIPTS[script](flags)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    if subprocess.run([*launcher, script, *flags], cwd=REPO, env=env).returncode:
        sys.exit(f"error: {script} failed; fix the cause and rerun: finished runs are kept")


def train(config, out, budget, nproc, **flags):
    """train.py --config CONFIG with the flags (the budget's sizes where the flags give none: --row-steps wins over
    the 30-minute row's steps) -> the run's checkpoint."""
    flags = {**budget["train"], **budget["stages"].get(config, {}), **flags}
    steps = flags.get("steps", SHAPES_CONFIGS[config]["steps"])
    flags.update(log_every=max(1, steps // 10), out=out)
    launch("train.py", ["--config", config, *[item for name, value in flags.items()
                                             for item in (f"--{name.replace('_', '-')}", value)]], nproc)
    return out / "latest.pt"


def train_stages(task, out, budget, nproc):
    """The pipeline's stages for `task` -> {stage: checkpoint path}."""
    stages = {"unet": train("shapes-unet", out / "unet", budget, nproc)}
    stages["reward"] = train("shapes-estimator-reward", out / task / "estimator-reward", budget, nproc, task=task)
    stages["eval"] = train("shapes-estimator-eval", out / task / "estimator-eval", budget, nproc, task=task,
                           seed=EVAL_ESTIMATOR_SEED)
    on_base = dict(base=stages["unet"], task=task)
    stages["probe"] = train("shapes-probe", out / task / "probe", budget, nproc, **on_base)
    stages["controlnet"] = train("shapes-controlnet", out / task / "controlnet", budget, nproc, **on_base)
    return stages


def table_rows(task, numbers=None):
    """The task's Table 2 rows, all or those numbered (their order in DEPTH_ROWS / OTHER_ROWS)
    -> {number: (name, Eq. 8 settings)}."""
    rows = list((DEPTH_ROWS if task == "depth" else OTHER_ROWS).items())
    numbers = range(len(rows)) if numbers is None else numbers
    if not all(0 <= number < len(rows) for number in numbers):
        raise ValueError(f"--rows: the {task} table's rows are numbered 0 to {len(rows) - 1}")
    return {number: rows[number] for number in numbers}


def train_rows(task, out, stages, budget, nproc, rows, steps):
    """One run per Table 2 row (rows: `table_rows`), each from the fine-tuned ControlNet, for `steps` (None: the
    shapes-innercontrol config's) -> {row name: (folder tag, checkpoint path)}."""
    partners = dict(base=stages["unet"], task=task, init=stages["controlnet"], probe=stages["probe"],
                    reward_model=stages["reward"], **({} if steps is None else dict(steps=steps)))
    suffix = budget["tag"] + ("" if steps is None else f"-{steps}steps")
    return {name: (f"row{number}{suffix}", train("shapes-innercontrol", out / task / f"rows{suffix}" / f"row{number}",
                                                 budget, nproc, **partners, **settings))
            for number, (name, settings) in rows.items()}


def real_images_samples(task, folder, budget):
    """The evaluation scenes' own images written as sample.py would: the estimator's floor on the table."""
    scenes = evaluation_scenes(SCENES, budget["scenes"])
    scene_indices = np.repeat(np.arange(budget["scenes"]), budget["seeds"])  # each scene once per sampling seed
    return write_samples(folder, render(scenes, scene_indices)[0], scene_indices, dict(task=task, config=SCENES))


def base_alone_samples(task, folder, stages, budget, seed):
    """The base UNet without a ControlNet on the evaluation scenes' captions, sampled as a row is (sample i: scene i,
    noise seed 1000 x seed + i) and written as sample.py would: what the base draws, and how close a caption alone
    comes to the control."""
    if shapes_sampling.drawn_after(folder, stages["unet"]):
        return folder
    base, config = runs.load_trained(stages["unet"], "unet")
    config = dict(config, task=task)
    scene_indices, images = shapes_sampling.controlnet_share(
        base, None, config, Distributed(0, 1, torch.device("cpu")), budget["scenes"], budget["sample_steps"],
        budget["cfg"], seed=1000 * seed, eta=budget["eta"])
    settings = dict(task=task, config=config, controlnet=None, seed=1000 * seed, steps=budget["sample_steps"],
                    eta=budget["eta"], cfg=budget["cfg"])
    return write_samples(folder, images, scene_indices, settings)


def write_samples(folder, images, scene_indices, settings):
    """Images (N, H, W, 3) uint8 of evaluation scenes written as sample.py writes a controlnet run's (samples.npz with
    the scene indices, settings.json), for eval.py innercontrol. -> folder"""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "samples.npz", arr_0=images, arr_1=scene_indices)
    settings = dict(settings, job="controlnet", scene_seed=EVAL_SCENE_SEED)
    (folder / "settings.json").write_text(json.dumps(settings))
    return folder


def score(samples, stages, classifier, budget):
    return eval_script.main(["innercontrol", "--samples", str(samples), "--estimator", str(stages["eval"]),
                          "--classifier", str(classifier), "--ref-shapes", str(budget["ref_shapes"])])


def evaluate_rows(task, out, stages, rows, classifier, budget, nproc):
    """Sample every row ({name: (folder tag, checkpoint)}) with each seed and score it; the mean over seeds.
    -> {row: {metric: mean, "per_seed": [...]}}"""
    real = real_images_samples(task, out / task / "samples" / "real", budget)
    table = {"real images": score(real, stages, classifier, budget)}
    for name, (tag, checkpoint) in {BASE_ALONE: ("base-alone", None), **rows}.items():
        per_seed = []
        for seed in range(budget["seeds"]):
            folder = out / task / "samples" / f"{tag}-seed{seed}"
            if checkpoint is None:
                base_alone_samples(task, folder, stages, budget, seed)
            elif not shapes_sampling.drawn_after(folder, checkpoint):
                launch("sample.py", [checkpoint, "--num-samples", budget["scenes"], "--seed", 1000 * seed,
                                     "--cfg", budget["cfg"], "--steps", budget["sample_steps"], "--eta", budget["eta"],
                                     "--out", folder], nproc)
            per_seed.append(score(folder, stages, classifier, budget))
        metrics = [key for key in per_seed[0] if isinstance(per_seed[0][key], float)]
        table[name] = {key: float(np.mean([report[key] for report in per_seed])) for key in metrics}
        table[name]["per_seed"] = per_seed
    return table


def markdown_table(task, table):
    metric = CONTROL_METRICS[task]
    better = "lower" if metric == "rmse" else "higher"
    lines = [f"| {task} | {metric} ({better} is better) | FD-shapes | precision | recall |", "|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {row[metric]:.3f} | {row['fd_shapes']:.2f} | {row['precision']:.3f} | "
                     f"{row['recall']:.3f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Fig. 2 and Fig. 3 analogs
# ---------------------------------------------------------------------------------------------------------------------

def figure_rows(task, stages, budget):
    """errors_across_t on the fine-tuned ControlNet over the first fig_scenes evaluation scenes, once per noise seed
    0 .. seeds - 1 -> (rows of each seed, the first scene's image and control)."""
    base, _ = runs.load_trained(stages["unet"], "unet")
    controlnet, config = runs.load_trained(stages["controlnet"], "controlnet")
    probe, probe_config = runs.load_trained(stages["probe"], "probe")
    reward_model, _ = runs.load_trained(stages["reward"], "estimator")
    scenes = evaluation_scenes(config, budget["fig_scenes"])
    images, tokens, control = pipeline.collate_shapes([scenes[i] for i in range(len(scenes))], task)
    batch = images, tokens, control, pipeline.hint_of(control, task)
    rows = [errors_across_t(base, controlnet, probe, probe_config["tap_mode"], reward_model,
                            DDPMSchedule.named(config["beta_schedule"]), task, batch, FIG2_TIMESTEPS, seed)
            for seed in range(budget["seeds"])]
    return rows, images[0], control[0]


def mean_across_seeds(rows_of_seeds):
    """Fig. 2's numbers: per t, the probe's and the reward model's metrics averaged over the noise seeds, and each
    seed's."""
    rows = []
    for at_t in zip(*rows_of_seeds):
        row = {"t": at_t[0]["t"]}
        for reader in ("probe", "reward"):
            row[reader] = {name: float(np.mean([seed_row[reader][name] for seed_row in at_t]))
                           for name in at_t[0][reader]}
            row[f"{reader}_per_seed"] = [seed_row[reader] for seed_row in at_t]
        rows.append(row)
    return rows


def picture(tensor, task):
    """A (3, H, W) image in [-1, 1], or a control reading (maps in [0, 1] or logits) -> (H, W, 3) uint8."""
    if tensor.shape[0] == 3:
        return to_uint8(tensor[None])[0]
    return pipeline.control_picture(tensor.argmax(0) if task == "segmentation" else tensor.clamp(0, 1), task)


def write_figures(task, rows, across_t, image, control, folder, scale=4):
    """fig2.png: the control metric across t (across_t: the mean over noise seeds), probe vs reward model. fig3.png:
    the first scene's real image and exact control on top, then one row per t in 0, 200, ..., 999 (rows: those of one
    noise seed): the one-step estimate x0, the reward model's reading of it, the probe's reading of the decoder
    features."""
    metric = CONTROL_METRICS[task]
    chart = line_chart({"probe on decoder features": ((40, 90, 220),
                                                      [(r["t"], r["probe"][metric]) for r in across_t]),
                        "reward model on one-step x0": ((220, 60, 40),
                                                        [(r["t"], r["reward"][metric]) for r in across_t])},
                       f"control {metric} vs timestep t")
    chart.save(folder / "fig2.png")
    shown = [row for row in rows if row["t"] in (0, 200, 400, 600, 800, 999)]
    exact = pipeline.control_picture(control, task)
    tiles = [[picture(image, task), exact, np.full_like(exact, 255)]]
    tiles += [[picture(row[key], task) for key in ("x0", "reward_estimate", "probe_estimate")] for row in shown]
    grid = np.concatenate([np.concatenate(tile_row, axis=1) for tile_row in tiles], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(
        folder / "fig3.png")


# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="depth", choices=list(pipeline.SHAPES_TASKS))
    parser.add_argument("--out", default="runs/innercontrol")
    parser.add_argument("--nproc", type=int, default=1, help="ranks for training and sampling (torchrun)")
    parser.add_argument("--classifier", help="FD-shapes classifier (default: OUT/shapes-classifier.pt, trained "
                                             "there if missing)")
    parser.add_argument("--rows", type=lambda text: [int(number) for number in text.split(",")],
                        help="comma-separated numbers of the Table 2 rows to train and score (default: all; depth: "
                             "0 fine-tuned, 1 + alignment, 2 + reward [0, 200], 3 + reward [0, 920], 4 + both)")
    parser.add_argument("--row-steps", type=int, help="train the rows for N steps instead of the shapes-innercontrol "
                                                      "config's (in OUT/TASK/rows-Nsteps)")
    parser.add_argument("--thirty-minutes", action="store_true",
                        help="the sizes of the whole pipeline in ~30 min on 2 cores (issue 24), the Eq. 8 row alone "
                             "unless --rows; rows and table tagged -30min (give it its own --out)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed of every stage and row (the evaluation estimator keeps its own)")
    parser.add_argument("--quick", action="store_true", help="toy budgets: checks the plumbing in seconds")
    args = parser.parse_args(argv)
    try:  # bad input stops here, before any training
        if args.quick and args.thirty_minutes:
            raise ValueError("--quick and --thirty-minutes are two budgets: give one")
        last_row = [len(table_rows(args.task)) - 1]  # the Eq. 8 row
        chosen_rows = table_rows(args.task, last_row if args.thirty_minutes and not args.rows else args.rows)
        check_arguments(args, counts=("nproc", "row_steps"))
        out = writable_folder(Path(args.out).resolve())
    except ValueError as error:
        exit_with_error(error)
    budget = BUDGETS["quick" if args.quick else "30min" if args.thirty_minutes else "full"]
    budget, start = dict(budget, train=dict(budget["train"], seed=args.seed)), time.perf_counter()
    classifier = Path(args.classifier) if args.classifier else out / "shapes-classifier.pt"
    if not classifier.exists():
        print(f"training the FD-shapes classifier into {classifier}", flush=True)
        save_classifier(train_classifier(SCENES["image_size"], steps=budget["classifier_steps"]), classifier)
    training_start = time.perf_counter()  # the pipeline's own time: its stages and rows (this invocation's share)
    stages = train_stages(args.task, out, budget, args.nproc)
    rows = train_rows(args.task, out, stages, budget, args.nproc, chosen_rows, args.row_steps)
    training_seconds = time.perf_counter() - training_start
    print(f"stages and rows trained in {training_seconds / 60:.1f} min", flush=True)
    table = evaluate_rows(args.task, out, stages, rows, classifier, budget, args.nproc)
    folder = out / args.task
    figure, image, control = figure_rows(args.task, stages, budget)
    across_t = mean_across_seeds(figure)
    write_figures(args.task, figure[0], across_t, image, control, folder)
    report = dict(task=args.task, budget=budget, row_steps=args.row_steps, table=table, errors_across_t=across_t,
                  training_seconds=training_seconds, seconds=time.perf_counter() - start)
    name = "-".join(["table", *(["30min"] if args.thirty_minutes else []),
                     *([f"rows{'-'.join(map(str, args.rows))}"] if args.rows else []),
                     *([f"{args.row_steps}steps"] if args.row_steps else [])])
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2))
    (folder / f"{name}.md").write_text(markdown_table(args.task, table))
    print(markdown_table(args.task, table))
    print(f"wrote {folder}/{name}.json, {name}.md, fig2.png, fig3.png ({report['seconds'] / 60:.1f} min, of which "
          f"training {training_seconds / 60:.1f})")
    return report


if __name__ == "__main__":
    main()
