"""IG against unguided sampling and IG + CFG against CFG on a class-conditional shapes DiT run, with every setting
chosen on one set of sampling seeds and reported on others (the IG paper's comparisons on the CPU testbed):

    python -m shapes.guidance_sweep runs/one-object-16px --classifier runs/shapes-classifier-16.pt [--out DIR]
    python -m shapes.guidance_sweep RUN --classifier C --quick       # seconds: the plumbing (the tests run it)

Selection (samples from --select-seed on): IG w over --ig, CFG s over --cfg, IG + CFG over the --ig-cfg pairs; in each
family the setting with the lowest FD-shapes is chosen. Report (samples from each --report-seeds on): unguided, every
IG w (FD-shapes and label accuracy against w, as the paper plots FID against w), the chosen CFG and the chosen IG +
CFG. Every setting samples with the run's sampler and --steps: IG adds no network evaluation, CFG doubles them.
Samples by sample.py (kept in OUT: a rerun only scores them, unless the run was trained since), scores by eval.py
fd-shapes against --ref-shapes true scenes of the run's kind (its size and objects a scene). Writes OUT/sweep.json,
OUT/table.md and OUT/guidance.png.
"""
import argparse
import json
import time
from pathlib import Path

from PIL import Image

import eval as eval_script  # the script eval.py; named so the builtin eval stays unshadowed
import sample as sample_script
from ref.arguments import check_arguments, check_finite, check_seed
from ref.control_evaluation import line_chart
from ref.runtime import exit_with_error
from shapes import runs
from shapes.sampling import drawn_after

METRICS = ("fd_shapes", "precision", "recall", "label_accuracy")
COLOURS = [(40, 90, 220), (220, 60, 40), (40, 160, 80), (150, 60, 200)]


def parse_pairs(text):
    """"1.5:2,2:1.5" -> [(1.5, 2.0), (2.0, 1.5)]: (IG w, CFG s) pairs."""
    return [tuple(float(value) for value in pair.split(":")) for pair in text.split(",")]


def parse_floats(text):
    return [float(value) for value in text.split(",")]


class Scorer:
    """Samples of one setting (cached in OUT) and their FD-shapes report."""

    def __init__(self, args, max_objects):
        self.args, self.max_objects, self.out = args, max_objects, Path(args.out)

    def __call__(self, seed, ig=1.0, cfg=1.0):
        folder = self.out / f"seed{seed}-ig{ig:g}-cfg{cfg:g}"
        if not drawn_after(folder, self.args.run):
            sample_script.main([self.args.run, "--num-samples", str(self.args.num_samples), "--seed", str(seed),
                                "--steps", str(self.args.steps), "--ig", str(ig), "--cfg", str(cfg), "--weights",
                                self.args.weights, "--out", str(folder)])
        settings = json.loads((folder / "settings.json").read_text())
        report = eval_script.main(["fd-shapes", "--samples", str(folder / "samples.npz"), "--classifier",
                                   self.args.classifier, "--ref-shapes", str(self.args.ref_shapes),
                                   "--ref-max-objects", str(self.max_objects)])
        return dict(seed=seed, ig=ig, cfg=cfg, nfe=settings["network_evaluations_per_sample"],
                    **{name: report[name] for name in METRICS})


def choose(rows):
    return min(rows, key=lambda row: row["fd_shapes"])


def markdown_table(report):
    seeds = " / ".join(f"seeds {seed}+" for seed in report["report_seeds"])
    lines = [f"| method | NFE | FD-shapes ({seeds}) | precision | recall | label accuracy |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, rows in report["table"].items():
        cells = [" / ".join(f"{row[metric]:.3f}" if metric != "fd_shapes" else f"{row[metric]:.2f}" for row in rows)
                 for metric in METRICS]
        lines.append(f"| {name} | {rows[0]['nfe']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def guidance_chart(curves, weights):
    """FD-shapes and label accuracy against IG w, one line per report seed set, side by side."""
    charts = []
    for metric, title in (("fd_shapes", "FD-shapes vs IG weight w"), ("label_accuracy", "label accuracy vs IG w")):
        series = {f"seeds {seed}+": (COLOURS[index % len(COLOURS)], [(row["ig"], row[metric]) for row in rows])
                  for index, (seed, rows) in enumerate(curves.items())}
        charts.append(line_chart(series, title, x_ticks=weights))
    image = Image.new("RGB", (sum(chart.width for chart in charts), charts[0].height), "white")
    for index, chart in enumerate(charts):
        image.paste(chart, (index * charts[0].width, 0))
    return image


def check_values(args):
    """Counts at least 1, finite weights, every sampling seed set within numpy's range (sample.py's own checks, made
    before the first setting)."""
    check_arguments(args, counts=("num_samples", "steps", "ref_shapes"))
    for name, weights in (("ig", args.ig), ("cfg", args.cfg), ("ig_cfg", [w for pair in args.ig_cfg for w in pair])):
        for weight in weights:
            check_finite({name: weight})
    for name, seeds in (("select_seed", [args.select_seed]), ("report_seeds", args.report_seeds)):
        for seed in seeds:
            check_seed(name, seed, args.num_samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a dit run on shapes scenes (train.py's folder or checkpoint)")
    parser.add_argument("--classifier", required=True, help="FD-shapes classifier at the run's image size "
                                                            "(eval.py train-shapes-classifier --image-size S)")
    parser.add_argument("--out", help="default: RUN/guidance-sweep")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=40, help="sampler steps of every setting")
    parser.add_argument("--weights", default="ema", choices=["ema", "model"])
    parser.add_argument("--ref-shapes", type=int, default=2000, help="true scenes FD-shapes compares against")
    parser.add_argument("--ig", type=parse_floats, default="1.25,1.5,2,2.5,3",
                        help="IG weights w (> 1 guides; < 1 moves towards D_i)")
    parser.add_argument("--cfg", type=parse_floats, default="1.5,2,3,4", help="CFG scales s (> 1)")
    parser.add_argument("--ig-cfg", type=parse_pairs, default="1.25:1.5,1.25:2,1.5:1.5,1.5:2,1.5:3",
                        help="IG + CFG pairs w:s")
    parser.add_argument("--select-seed", type=int, default=0, help="first sampling seed of the selection set")
    parser.add_argument("--report-seeds", type=int, nargs="+", default=[100000, 500000],
                        help="first sampling seed of each held-out report set")
    parser.add_argument("--quick", action="store_true", help="8 samples, 2 steps, 16 true scenes, 2 settings a family")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.steps, args.ref_shapes = 8, 2, 16
        args.ig, args.cfg, args.ig_cfg = args.ig[:2], args.cfg[:2], args.ig_cfg[:2]
    run = Path(args.run)
    try:  # bad input stops here, before anything is sampled or written
        check_values(args)
        config = runs.trained_config(run / "latest.pt" if run.is_dir() else run, "dit")
        if config["data"] != "shapes":
            raise ValueError(f"{args.run} trained on {config['data']}, not on shapes scenes")
    except ValueError as error:
        exit_with_error(error)
    args.out = args.out or str((run if run.is_dir() else run.parent) / "guidance-sweep")
    score, start = Scorer(args, config["shapes_max_objects"]), time.perf_counter()

    selection = {"IG": [score(args.select_seed, ig=w) for w in args.ig],
                 "CFG": [score(args.select_seed, cfg=s) for s in args.cfg],
                 "IG + CFG": [score(args.select_seed, ig=w, cfg=s) for w, s in args.ig_cfg]}
    chosen = {family: choose(rows) for family, rows in selection.items()}
    curves = {seed: [score(seed, ig=w) for w in [1.0, *args.ig]] for seed in args.report_seeds}
    table = {"unguided": [rows[0] for rows in curves.values()],
             f"IG w = {chosen['IG']['ig']:g}": [next(row for row in rows if row["ig"] == chosen["IG"]["ig"])
                                                 for rows in curves.values()],
             f"CFG s = {chosen['CFG']['cfg']:g}": [score(seed, cfg=chosen["CFG"]["cfg"])
                                                   for seed in args.report_seeds],
             f"IG w = {chosen['IG + CFG']['ig']:g} + CFG s = {chosen['IG + CFG']['cfg']:g}":
                 [score(seed, ig=chosen["IG + CFG"]["ig"], cfg=chosen["IG + CFG"]["cfg"])
                  for seed in args.report_seeds]}
    report = dict(run=args.run, steps=args.steps, num_samples=args.num_samples, weights=args.weights,
                  select_seed=args.select_seed, report_seeds=args.report_seeds, selection=selection,
                  chosen=chosen, curves={str(seed): rows for seed, rows in curves.items()}, table=table,
                  seconds=time.perf_counter() - start)
    out = Path(args.out)
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(markdown_table(report))
    guidance_chart(curves, [1.0, *args.ig]).save(out / "guidance.png")
    print(markdown_table(report))
    print(f"wrote {out}/sweep.json, table.md, guidance.png ({report['seconds'] / 60:.1f} min)")
    return report


if __name__ == "__main__":
    main()
