"""Evaluate generated images: the ADM image metrics (IG), FD-shapes on the Shapes data, and the control-alignment
metrics (InnerControl).

    python eval.py fid --samples S.npz --ref R.npz [--inception PATH] [--out metrics.json]
    python eval.py fid --samples IMAGES --write-ref R.npz [--inception PATH]
    python eval.py train-shapes-classifier [--classifier PATH] [--steps 2000] [--image-size 32]
    python eval.py fd-shapes --samples S.npz (--ref R.npz | --ref-shapes N [--ref-max-objects K]) [--classifier PATH]
    python eval.py control --task depth|edges|seg --generated DIR_or_NPZ --controls DIR_or_NPZ [--out metrics.json]
    python eval.py innercontrol --samples SAMPLE_DIR --estimator runs/shapes-estimator-eval-depth/latest.pt [...]
    python eval.py innercontrol-sd --samples SAMPLE_DIR --data-path FOLDER --task depth|hed|lineart|segmentation \
                   --eval-model FILE [--eval-model-kind dpt-large|dpt-hybrid-midas] [--inception FILE] \
                   [--num-classes 150] [--out metrics.json]
    python eval.py innercontrol-sd-curve --probe runs/sd15-probe-depth --reward-model FILE --data-path FOLDER \
                   [--run CONTROLNET] [--timesteps 0,100,...,900] [--num-images 8] [--out fig2-sd.json]

fid: IS, FID, sFID and precision/recall as the ADM evaluator computes them; `python eval.py fid --help` says how,
and what is left different.
fd-shapes: FD-shapes (the Frechet distance of the Shapes classifier's 128-d features; not FID) and precision/recall
(k = 3) against reference images: an .npz or folder (--ref), or the first N true scenes of Shapes(seed=--ref-seed,
max_objects=--ref-max-objects) at the samples' size, rendered on the fly (--ref-shapes N); with labels in the samples'
arr_1, label_accuracy too. The classifier comes from train-shapes-classifier (ref/shapes_classifier.py).
control: the maps extracted from the generated images (evaluation depth model, edge annotator, segmenter) against the
input controls, paired in order. The logic lives in ref/metrics.py.
innercontrol: for sample.py's output on a controlnet run: the evaluation estimator reads the control back from each
sample (ref/innercontrol.py: RMSE for depth, mIoU for segmentation, SSIM for edges, against the exact control of the
scene the sample followed), and FD-shapes / precision / recall against the first --ref-shapes evaluation scenes.
innercontrol-sd: for `sample.py sd15 --data-path FOLDER`'s output, the ControlNet++ / InnerControl protocol
(ref/sd_evaluation.py): the evaluation model on each generated image against the pair's control (depth: RMSE on
0-255; hed / lineart: MS-SSIM and SSIM against the annotator on the real image; segmentation: mIoU), taken over all
generated images as the released evaluation does (mIoU pooled over every seed's images), per seed beside; with
--inception, FID (and IS, sFID, precision/recall) against the folder's real images cut as for training. Prints a
table row, writes the JSON.
innercontrol-sd-curve: Fig. 2 at SD scale: the control metric across t of the sd-probe run's probe on the decoder
features and of the reward model on the decoded one-step x0 (Eq. 5), for SD1.5 alone and, with --run, steered by that
ControlNet (a ControlNet file / folder or an sd-controlnet run); --out's JSON and a PNG chart beside it.
"""
import argparse
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from ref import runtime, sd_evaluation
from ref.arguments import check_arguments, flag, usable_device, writable_file
from ref.control_evaluation import CURVE_METRICS, ControlScore
from ref.inception import INPUT_PIPELINES, FIDInceptionV3, InceptionWeightsError
from ref.innercontrol_sd import REWARD_TASKS, control_model
from ref.metrics import (CONTROL_MAP_MODES, ImageSource, control_alignment, fid_report, load_reference,
                         recorded_pipeline, reference_contents, save_reference, summarise_images)
from shapes import pipeline, runs
from shapes.classifier import (ShapesImages, fd_shapes_report, held_out_accuracy, load_classifier,
                                   save_classifier, to_unit_range, train_classifier)
from shapes.data import MAX_OBJECTS
from shapes.evaluation import EVAL_SCENE_SEED, evaluation_scenes

DEFAULT_CLASSIFIER = "runs/shapes-classifier.pt"
FID_HELP = """IS of the samples; with --ref, FID, sFID and precision/recall (k = 3) against an ADM reference batch
(stored mu/sigma/mu_s/sigma_s are used when present, images in arr_0 give precision/recall). Samples are ADM-style
.npz (arr_0: (N, H, W, 3) uint8) or folders of images. --write-ref writes the samples as a reference batch
(images and moments) that this script and the ADM evaluator read. Weights: --inception PATH or $REF_INCEPTION_WEIGHTS
(pt_inception-2015-12-05-6726825d.pth from the pytorch-fid release).

As the ADM evaluator (guided-diffusion evaluations/evaluator.py): IS averages splits of 5,000 samples (the last one
shorter); --resize tf1, the default, feeds the Inception as the TF graph behind the ADM reference batches does: TF1's
legacy bilinear resize to 299 (output pixel d reads input d * in/out, clamped at the last pixel), then pixels
(u - 128) / 128. --resize pytorch is pytorch-fid's pipeline (half-pixel bilinear, (u - 127.5) / 127.5). A reference
written by --write-ref records its pipeline and the default follows it.

Left different from the ADM evaluator: the convolutions round as PyTorch's kernels do, not TF's (float32 rounding;
on GPU, TF's resize kernel may also round its last bit otherwise); IS takes softmax and logarithms in float64 (ADM:
float32); precision/recall compare float32 distances (ADM: float16, float32 only on overflow), so a sample on the edge
of a k-NN ball can count differently."""


class Progress:
    """on_batch callback: prints done/total, elapsed time and ETA at the first batch, then at most every `interval`
    seconds, and at the end."""

    def __init__(self, label, interval=10.0):
        self.label, self.interval = label, interval
        self.start, self.last_print = time.time(), None

    def __call__(self, done, total):
        now = time.time()
        if self.last_print is not None and now - self.last_print < self.interval and done < total:
            return
        self.last_print, elapsed = now, now - self.start
        eta = elapsed / done * (total - done)
        print(f"{self.label}: {done}/{total} images, {elapsed:.0f} s elapsed, ETA {eta:.0f} s", flush=True)


def inception_resize(args):
    """--resize, by default what the reference batch records (one --write-ref wrote), else tf1: the TF graph's
    pipeline, which made the ADM reference batches' stored mu/sigma. A choice that differs from the recorded one is
    refused; pytorch against stored statistics without a record (an ADM batch) is warned about."""
    recorded, stored = recorded_pipeline(args.ref) if args.ref else (None, False)
    if args.ref and reference_contents(args.ref)[1]:  # its images of the documented layout, before any compute
        ImageSource(args.ref, "RGB")
    if args.resize is None:
        return recorded or "tf1"
    if recorded and recorded != args.resize:
        raise ValueError(f"{args.ref} holds statistics of --resize {recorded}; scoring the samples with --resize "
                         f"{args.resize} would compare two input pipelines (leave --resize out to follow the "
                         f"reference)")
    if args.resize == "pytorch" and stored and not recorded:
        print(f"warning: {args.ref}'s stored mu/sigma come from the ADM evaluator's TF graph (--resize tf1); with "
              f"--resize pytorch the samples take another input pipeline and FID is offset", file=sys.stderr)
    return args.resize


def run_fid(args, extractor=None):
    resize = inception_resize(args)
    samples = ImageSource(args.samples, "RGB")
    extractor = extractor or FIDInceptionV3(args.inception, resize=resize).to(args.device)
    summary = summarise_images(samples, extractor, args.batch_size, args.device, Progress("samples"))
    if args.write_ref:
        save_reference(args.write_ref, samples, summary, resize)
        print(f"wrote reference batch {args.write_ref}")
    reference = (load_reference(args.ref, extractor, args.batch_size, args.device, Progress("reference"))
                 if args.ref else None)
    return {"resize": resize, **fid_report(summary, reference)}


def sample_labels(path):
    """arr_1 of an ADM .npz (the class each sample was generated for), or None: a folder or no arr_1."""
    if not zipfile.is_zipfile(path):
        return None
    with np.load(path) as archive:
        return archive["arr_1"] if "arr_1" in archive.files else None


def run_fd_shapes(args):
    samples = ImageSource(args.samples, "RGB")
    if args.ref:
        reference = ImageSource(args.ref, "RGB")
    else:
        size = next(samples.batches(1)).shape[1]  # the samples' side in pixels
        reference = ShapesImages(args.ref_shapes, size, args.ref_seed, args.ref_max_objects)
    classifier = load_classifier(args.classifier).to(args.device)
    summaries = [summarise_images(images, classifier, args.batch_size, args.device, Progress(name))
                 for name, images in (("samples", samples), ("reference", reference))]
    return fd_shapes_report(*summaries, sample_labels=sample_labels(args.samples))


def run_innercontrol(args):
    """The control metric of the evaluation estimator on sample.py's output for a controlnet run (its settings.json
    names the task and the evaluation scenes), and FD-shapes against the first --ref-shapes evaluation scenes."""
    folder = Path(args.samples)
    settings_path = folder / "settings.json"
    if not settings_path.is_file():
        raise ValueError(f"{settings_path}: missing; expected the folder sample.py writes for a controlnet run")
    settings = json.loads(settings_path.read_text())
    if settings.get("job") != "controlnet":
        raise ValueError(f"{folder} holds samples of a {settings.get('job', 'dit')} run, not of a controlnet run")
    task = settings["task"]
    estimator, estimator_config = runs.load_trained(args.estimator, "estimator")
    if estimator_config["task"] != task:
        raise ValueError(f"{args.estimator} estimates {estimator_config['task']}; the samples are for {task}")
    estimator.to(args.device)
    samples = ImageSource(folder / "samples.npz", "RGB")
    with np.load(folder / "samples.npz") as archive:
        scene_indices = archive["arr_1"]
    config = dict(runs.OLD_SCENES, **settings["config"])  # samples written before the field: up to 3 objects a scene
    scenes = evaluation_scenes(config, int(scene_indices.max()) + 1)
    score, done, progress = ControlScore(task, pipeline.SEGMENT_CLASSES), 0, Progress("control")
    for batch in samples.batches(args.batch_size):
        images = 2 * to_unit_range(batch).to(args.device) - 1  # (B, 3, H, W) in [-1, 1]
        indices = scene_indices[done:done + len(batch)]
        controls = torch.stack([pipeline.control_of(scenes[int(i)], task) for i in indices])
        with torch.no_grad():
            score.update(estimator(images), controls)
        done += len(batch)
        progress(done, len(samples))
    report = {"task": task, "samples": len(samples), **score.result()}
    classifier = load_classifier(args.classifier).to(args.device)
    reference = ShapesImages(args.ref_shapes, config["image_size"], EVAL_SCENE_SEED, config["shapes_max_objects"])
    summaries = [summarise_images(images, classifier, args.batch_size, args.device, Progress(name))
                 for name, images in (("samples", samples), ("reference", reference))]
    fd = fd_shapes_report(*summaries)
    report.update(fd_shapes=fd["fd_shapes"], precision=fd["precision"], recall=fd["recall"])
    return report


def run_innercontrol_sd(args, extractor=None):
    """The control metric of the evaluation model on sample.py sd15's output, over all images and per seed, and, with
    --inception (or an extractor stand-in), FID against the data folder's real images."""
    settings, pair_indices, samples = sd_evaluation.read_samples(args.samples)
    dataset = sd_evaluation.sample_dataset(args.samples, settings, args.data_path, args.task)
    model = control_model(args.task, args.eval_model, args.num_classes, args.eval_model_kind).to(args.device)
    scores = sd_evaluation.control_scores(samples, pair_indices, settings["seeds_per_prompt"], dataset, args.task,
                                          model, args.num_classes, args.batch_size, args.device, Progress("control"))
    report = {"task": args.task, "samples": len(samples), "pairs": len(dataset),
              "seeds_per_prompt": settings["seeds_per_prompt"], **scores}
    if args.inception or extractor:
        extractor = extractor or FIDInceptionV3(args.inception, resize=args.resize).to(args.device)
        summaries = [summarise_images(images, extractor, args.batch_size, args.device, Progress(name))
                     for name, images in (("samples", samples), ("real", sd_evaluation.RealImages(dataset)))]
        report["fid"] = fid_report(*summaries)
    return report


def run_innercontrol_sd_curve(args):
    """Fig. 2 at SD scale: the curves as JSON (the report) and the chart as a PNG beside --out."""
    timesteps = sd_evaluation.parse_timesteps(args.timesteps)
    release_flags = dict(task=args.task, sd_size=args.sd_size, image_size=args.image_size)
    curves, task = sd_evaluation.fig2_curves(args.probe, args.reward_model, args.data_path, timesteps,
                                             args.num_images, args.run, args.sd15, args.tokenizer, args.device,
                                             args.seed, release_flags)
    chart = Path(args.out).with_suffix(".png")
    chart.parent.mkdir(parents=True, exist_ok=True)
    sd_evaluation.fig2_chart(curves, task).save(chart)
    print(f"wrote {chart}")
    return {"task": task, "metric": CURVE_METRICS[task], "num_images": args.num_images, "curves": curves}


def run_train_shapes_classifier(args):
    start, progress = time.time(), Progress("train", interval=20.0)
    total_images = args.steps * args.batch_size
    model = train_classifier(args.image_size, args.steps, args.batch_size, args.lr, args.seed,
                             on_step=lambda step, loss: progress((step + 1) * args.batch_size, total_images))
    seconds = time.time() - start
    report = {"test_accuracy": held_out_accuracy(model, args.test_images), "test_images": args.test_images,
              "train_seconds": seconds, "steps": args.steps, "batch_size": args.batch_size}
    save_classifier(model, args.classifier, **report)
    print(f"wrote shapes classifier {args.classifier}")
    return report


def run_control(args):
    return control_alignment(args.task, args.generated, args.controls, args.batch_size, args.num_classes,
                             args.ignore_index, Progress(args.task))


def print_row(report):
    """innercontrol-sd: one markdown table row (under its header) of the task's metrics and FID."""
    metrics = [name for name in ("rmse", "ms_ssim", "ssim", "miou") if name in report]
    fid = report.get("fid", {}).get("fid")
    print("| task | samples | " + " | ".join(metrics) + " | FID |\n|" + "---|" * (len(metrics) + 3))
    print(f"| {report['task']} | {report['samples']} | " + " | ".join(f"{report[name]:.4f}" for name in metrics)
          + f" | {'n/a' if fid is None else f'{fid:.2f}'} |")


def print_curves(report):
    metric = report["metric"]
    for name, rows in report["curves"].items():
        for reader in ("probe", "reward"):
            print(f"{name} {reader:<6} " + " ".join(f"t={row['t']}: {row[reader][metric]:.4f}" for row in rows))


def print_table(report):
    width = max(len(name) for name in report)
    for name, value in report.items():
        shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else value
        print(f"{name:<{width}}  {shown}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fid = commands.add_parser("fid", help="IS, FID, sFID, precision/recall (ADM evaluator compatible)",
                              description=FID_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    fid.add_argument("--samples", required=True, help="ADM .npz (arr_0 uint8 NHWC) or a folder of images")
    fid.add_argument("--ref", help="ADM reference .npz: arr_0 images and/or mu, sigma, mu_s, sigma_s")
    fid.add_argument("--write-ref", help="write the samples as a reference .npz (arr_0 and moments) to this path")
    fid.add_argument("--inception", help="FID Inception weights (default: $REF_INCEPTION_WEIGHTS)")
    fid.add_argument("--resize", choices=sorted(INPUT_PIPELINES),
                     help="Inception input pipeline: tf1 (the TF graph's, as the ADM evaluator) or pytorch "
                          "(pytorch-fid's); default: the one a --write-ref reference records, else tf1")
    fid.add_argument("--batch-size", type=int, default=50)
    train = commands.add_parser("train-shapes-classifier", help="train the Shapes classifier that FD-shapes uses")
    train.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="write the classifier here")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    train.add_argument("--image-size", type=int, default=32, help="training resolution; other sizes are resized to it")
    train.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    train.add_argument("--test-images", type=int, default=2000, help="held-out scenes for the test accuracy")
    fd_shapes = commands.add_parser("fd-shapes", help="FD-shapes and precision/recall on the Shapes classifier")
    fd_shapes.add_argument("--samples", required=True, help="ADM .npz (arr_0 uint8 NHWC, arr_1 labels) or a folder")
    references = fd_shapes.add_mutually_exclusive_group(required=True)
    references.add_argument("--ref", help="reference images: ADM .npz (arr_0) or a folder")
    references.add_argument("--ref-shapes", type=int, metavar="N", help="reference: the first N true Shapes scenes")
    fd_shapes.add_argument("--ref-seed", type=int, default=0, help="Shapes seed of --ref-shapes (0: the training data)")
    fd_shapes.add_argument("--ref-max-objects", type=int, default=MAX_OBJECTS,
                           help="at most this many objects in a --ref-shapes scene (the samples' training data's "
                                "--shapes-max-objects)")
    fd_shapes.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="from train-shapes-classifier")
    fd_shapes.add_argument("--batch-size", type=int, default=250)
    control = commands.add_parser("control", help="SSIM / MS-SSIM (edges), RMSE (depth), mIoU (seg)")
    control.add_argument("--task", required=True, choices=sorted(CONTROL_MAP_MODES))
    control.add_argument("--generated", required=True, help="maps extracted from the generated images: folder or .npz")
    control.add_argument("--controls", required=True, help="the input controls: folder or .npz, same order and size")
    control.add_argument("--num-classes", type=int, default=150, help="seg: number of classes (ADE20K: 150)")
    control.add_argument("--ignore-index", type=int, default=255, help="seg: label ignored in the controls")
    control.add_argument("--batch-size", type=int, default=16)
    innercontrol = commands.add_parser("innercontrol",
                                       help="control metric and FD-shapes of a controlnet run's samples")
    innercontrol.add_argument("--samples", required=True, help="the folder sample.py wrote for a controlnet run")
    innercontrol.add_argument("--estimator", required=True, help="the evaluation estimator run's latest.pt")
    innercontrol.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="from train-shapes-classifier")
    innercontrol.add_argument("--ref-shapes", type=int, default=2000, help="FD-shapes reference: evaluation scenes")
    innercontrol.add_argument("--batch-size", type=int, default=100)
    innercontrol_sd = commands.add_parser("innercontrol-sd", help="ControlNet++ protocol on sample.py sd15's output")
    innercontrol_sd.add_argument("--samples", required=True, help="the folder `sample.py sd15 --data-path` wrote")
    innercontrol_sd.add_argument("--data-path", required=True, help="the metadata.jsonl folder the pairs came from")
    innercontrol_sd.add_argument("--task", required=True, choices=REWARD_TASKS)
    innercontrol_sd.add_argument("--eval-model", required=True, help="Intel/dpt-large's model.safetensors (depth), "
                                 "ControlNetHED_Apache2.pth (hed), sk_model.pth (lineart), TorchScript segmenter "
                                 "(segmentation)")
    innercontrol_sd.add_argument("--eval-model-kind", choices=("dpt-large", "dpt-hybrid-midas"), default="dpt-large",
                                 help="depth: the DPT --eval-model holds: DPT-Large, the releases' evaluation model, "
                                      "or on request DPT-Hybrid, the reward model")
    innercontrol_sd.add_argument("--inception", help="FID Inception weights; FID is left out without them")
    innercontrol_sd.add_argument("--resize", choices=sorted(INPUT_PIPELINES), default="tf1",
                                 help="FID's Inception input pipeline (see `eval.py fid --help`)")
    innercontrol_sd.add_argument("--num-classes", type=int, default=150, help="segmentation: the segmenter's classes")
    curve = commands.add_parser("innercontrol-sd-curve", help="Fig. 2 at SD scale: probe vs reward model across t")
    curve.add_argument("--probe", required=True, help="an sd-probe run (folder or latest.pt): probe, task, SD1.5; or "
                                                      "an align model of the InnerControl release (with --task, "
                                                      "--sd15, --tokenizer)")
    curve.add_argument("--task", help="the release align model's task (default: the probe run's)")
    curve.add_argument("--sd-size", help="the release align model's model size (default sd15)")
    curve.add_argument("--image-size", type=int, help="the release align model's resolution (default 512)")
    curve.add_argument("--reward-model", required=True, help="D of the probe's task (as train.py --reward-model)")
    curve.add_argument("--data-path", required=True, help="a metadata.jsonl folder of the task: images, controls")
    curve.add_argument("--run", help="also the SD1.5 steered by this ControlNet: a ControlNet file / folder or an "
                                     "sd-controlnet run's latest.pt (its EMA weights)")
    curve.add_argument("--timesteps", default=",".join(str(t) for t in range(0, 1000, 100)))
    curve.add_argument("--num-images", type=int, default=8, help="the first N lines of the data folder")
    curve.add_argument("--sd15", help="the SD1.5 file (default: the probe run's)")
    curve.add_argument("--tokenizer", help="CLIP's vocabulary (default: the probe run's)")
    curve.add_argument("--seed", type=int, default=0, help="the noise draw shared by every t")
    curve.set_defaults(out="fig2-sd.json")
    for command in (innercontrol_sd, curve):
        command.add_argument("--batch-size", type=int, default=16)
    for command in (fid, fd_shapes, innercontrol, innercontrol_sd, curve):
        command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                             help="where the networks run (default: cuda when this torch sees one, else cpu)")
    for command in (fid, train, fd_shapes, control, innercontrol, innercontrol_sd, curve):
        command.add_argument("--out", help="write the metrics as JSON to this path (innercontrol-sd-curve: and the "
                             "chart as the same name .png; default fig2-sd.json)")
    return parser.parse_args(argv)


def check_values(args):
    """Counts at least 1, finite numbers, seeds in numpy's range, a --device this torch can use, and the files to be
    written (--out, --write-ref, train-shapes-classifier's --classifier) writable, before anything is read."""
    check_arguments(args, counts=("batch_size", "steps", "image_size", "test_images", "ref_shapes", "ref_max_objects",
                                  "num_classes", "num_images"), finite=("lr",), seeds=("seed", "ref_seed"))
    if getattr(args, "device", None):
        usable_device(args.device)
    written = ["out", "write_ref"] + (["classifier"] if args.command == "train-shapes-classifier" else [])
    for name in written:
        if getattr(args, name, None):
            writable_file(getattr(args, name), flag(name))


def main(argv=None, extractor=None):
    """extractor: a stand-in for the FID Inception (tests); it must return the same "pool", "logits", "spatial"."""
    args = parse_args(argv)
    commands = {"fid": lambda: run_fid(args, extractor), "fd-shapes": lambda: run_fd_shapes(args),
                "train-shapes-classifier": lambda: run_train_shapes_classifier(args),
                "control": lambda: run_control(args), "innercontrol": lambda: run_innercontrol(args),
                "innercontrol-sd": lambda: run_innercontrol_sd(args, extractor),
                "innercontrol-sd-curve": lambda: run_innercontrol_sd_curve(args)}
    try:
        check_values(args)
        report = commands[args.command]()
    except (ValueError, InceptionWeightsError) as error:  # bad input (ShapesClassifierError is a ValueError)
        runtime.exit_with_error(error)
    {"innercontrol-sd": print_row, "innercontrol-sd-curve": print_curves}.get(args.command, print_table)(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"command": args.command, "arguments": vars(args), "metrics": report}, f, indent=2)
    return report


if __name__ == "__main__":
    main()
