"""ControlNets on SD1.5 in the ControlNet++ / InnerControl evaluation protocol (../shared/notes/innercontrol.md,
"Evaluation protocol"), and Fig. 2 at SD scale.

    control_scores  what `sample.py sd15 --data-path FOLDER` wrote (samples.npz: arr_0 the images, arr_1 the pair of
                    each; settings.json: the pairs) against that folder: the evaluation model (control_model) on every
                    generated image. depth: RMSE on 0-255 of its max-normalised output against the min-max-scaled input
                    depth; hed / lineart: MS-SSIM (the released metric; SSIM beside) of the annotator on the
                    generated image against the annotator on the real image; segmentation: mIoU of the segmenter's
                    labels against the label map, 255 ignored. Each metric is taken over every generated image at
                    once, as the released evaluation does: RMSE and (MS-)SSIM the mean over images
                    (`eval/eval_depth.py`:28, InnerControl `eval/eval_edge.py`:64-70), mIoU pooled over the images of
                    all seeds (ControlNet++ `eval/eval_ade20k.sh`: mmseg's IoUMetric on the four seed folders as one
                    set); per seed beside.
    RealImages      the folder's real images, cut as for training: FID's reference set (ref.metrics.summarise_images)
    fig2_curves     Fig. 2: the control error across t of the probe on the decoder features against the reward model
                    on the decoded one-step estimate x0 (Eq. 5), for SD1.5 alone and steered by a ControlNet
Every image is cut as ControlDataset cuts it (short side to the samples' size, central square), the generated images'
pixels taken as the sampler wrote them.
"""
import json
from pathlib import Path

import numpy as np
import torch

from ref import sd_checkpoints
from ref.checkpoints import read_checkpoint
from ref.control_data import ControlDataset
from ref.control_evaluation import CURVE_METRICS, ControlScore, at_size, check_map_side, errors_across_t, line_chart
from ref.controlnet import ControlNet
from ref.data import to_uint8
from ref.innercontrol_sd import EDGE_TASKS, SD_CONFIGS, StableDiffusionRun, control_model, trained_probe
from ref.metrics import ImageSource
from ref.probes import is_release_align_model
from ref.runtime import SampleDraws, checkpoint_file, read_run_checkpoint

SAMPLER_JOB = "sd15-controlnet"  # settings.json's job of sample.py sd15


# ---------------------------------------------------------------------------------------------------------------------
# Generated samples against their data folder
# ---------------------------------------------------------------------------------------------------------------------

def read_samples(folder):
    """sample.py sd15's output folder. -> (settings, pair of each sample (N,), ImageSource of the images)"""
    folder = Path(folder)
    settings_path = folder / "settings.json"
    if not settings_path.is_file() or not (folder / "samples.npz").is_file():
        raise ValueError(f"{folder}: no settings.json and samples.npz; expected the folder `sample.py sd15` writes")
    settings = json.loads(settings_path.read_text())
    if settings.get("job") != SAMPLER_JOB:
        raise ValueError(f"{folder} holds samples of a {settings.get('job', 'dit')!r} run, not of `sample.py sd15`")
    with np.load(folder / "samples.npz") as archive:
        pair_indices = archive["arr_1"]
    return settings, pair_indices, ImageSource(folder / "samples.npz", "RGB")


def sample_dataset(folder, settings, data_path, task):
    """The data folder the samples' pairs came from, cut at their size; a folder of other captions or another task
    than the sampler's is refused naming the first difference. -> ControlDataset"""
    if settings.get("task") not in (None, task):
        raise ValueError(f"{folder} holds samples for {settings['task']}; --task {task} given")
    dataset = ControlDataset(data_path, task, settings["size"])
    prompts = [pair["prompt"] for pair in settings["pairs"]]
    if len(prompts) != len(dataset):
        raise ValueError(f"{folder} holds samples of {len(prompts)} pairs, {data_path} lists {len(dataset)}; expected "
                         f"the folder they were sampled from (sample.py sd15 --data-path)")
    for index, (prompt, entry) in enumerate(zip(prompts, dataset.entries)):
        if prompt != entry.caption:
            raise ValueError(f"{folder}: pair {index}'s prompt is {prompt!r}, {data_path} line {entry.line}'s caption "
                             f"{entry.caption!r}; expected the folder the samples were made from")
    return dataset


@torch.no_grad()
def control_scores(samples, pair_indices, seeds_per_prompt, dataset, task, model, num_classes=None, batch_size=16,
                   device="cpu", on_batch=None):
    """The task's control metric of the evaluation `model` (RGB in [0, 1] -> its reading, resized bilinearly to the
    control's size where it has another: a segmenter's logits, as mmsegmentation's inference resizes them) on every
    generated image (sample i: pair pair_indices[i], seed i mod seeds_per_prompt): one ControlScore over all of them,
    and one a seed; maps too small for the task's metric are refused first (check_map_side). -> {metric: over all
    images, "per_seed": [{metric: value}]}"""
    check_map_side(task, dataset.size)
    overall = ControlScore(task, num_classes)
    scores = [ControlScore(task, num_classes) for _ in range(seeds_per_prompt)]
    done = 0
    for batch in samples.batches(batch_size):
        images = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div(255).to(device)  # (B, 3, S, S) in [0, 1]
        indices = np.arange(done, done + len(batch))
        items = [dataset[int(pair_indices[i])] for i in indices]
        if task in EDGE_TASKS:  # the annotator on the real image, in [0, 1]
            controls = model((torch.stack([item[0] for item in items]).to(device) + 1) / 2)  # (B, 1, S, S)
        else:
            controls = torch.stack([item[2] for item in items])  # (B, 1, S, S) depth or (B, S, S) labels
        estimates = at_size(model(images), controls.shape[-2:])  # (B, 1 | K, S, S)
        overall.update(estimates, controls)
        for seed, score in enumerate(scores):
            chosen = torch.from_numpy(indices % seeds_per_prompt == seed)
            if chosen.any():
                score.update(estimates[chosen.to(estimates.device)], controls[chosen.to(controls.device)])
        done += len(batch)
        if on_batch:
            on_batch(done, len(samples))
    return {**overall.result(), "per_seed": [score.result() for score in scores]}


class RealImages:
    """The images of a ControlDataset as uint8 batches (B, S, S, 3), as ref.metrics.ImageSource yields them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def batches(self, batch_size):
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            yield to_uint8(torch.stack([self.dataset[index][0] for index in range(start, stop)]))


# ---------------------------------------------------------------------------------------------------------------------
# Fig. 2 at SD scale
# ---------------------------------------------------------------------------------------------------------------------

def parse_timesteps(text, num_timesteps=1000):
    """"0,100,...,900" -> [0, 100, ..., 900], each in [0, num_timesteps)."""
    try:
        timesteps = [int(value) for value in text.split(",")]
    except ValueError:
        raise ValueError(f"--timesteps must be integers separated by commas, got {text!r}") from None
    if not timesteps or not all(0 <= t < num_timesteps for t in timesteps):
        raise ValueError(f"--timesteps must lie in [0, {num_timesteps - 1}], got {text!r}")
    return timesteps


def probe_file_config(probe_path, release_flags):
    """The settings a probe file was made for: an sd-probe run's config; for an align model of the InnerControl
    release, which names no task, model size or resolution, sd15-probe's with release_flags laid over it ({"task"}
    required, "sd_size", "image_size"). A --task other than a probe run's is refused. -> config"""
    if is_release_align_model(read_checkpoint(probe_path)):
        if not release_flags.get("task"):
            raise ValueError(f"{probe_path} is an align model of the InnerControl release, which names no task: give "
                             f"--task")
        return dict(SD_CONFIGS["sd15-probe"], **{name: value for name, value in release_flags.items() if value})
    config = read_run_checkpoint(probe_path)["args"]
    if release_flags.get("task") not in (None, config["task"]):
        raise ValueError(f"{probe_path} is a probe for {config['task']}; --task {release_flags['task']} given")
    return config


def fig2_curves(probe_path, reward_path, data_path, timesteps, num_images, controlnet_path=None, sd15=None,
                tokenizer=None, device="cpu", seed=0, release_flags=None):
    """errors_across_t on the first num_images lines of the data folder, for SD1.5 alone ("sd15") and, with
    controlnet_path (a ControlNet file or folder, or an sd-controlnet run: its EMA weights), steered by that
    ControlNet ("controlnet"). The SD1.5 parts, tokenizer and task are the probe run's (sd15 / tokenizer: other
    paths to the same files); an align model of the InnerControl release needs them given (probe_file_config).
    -> ({model: [{"t", "probe": {metric: value}, "reward": {...}}]}, task)"""
    probe_path = checkpoint_file(probe_path)
    probe_config = probe_file_config(probe_path, release_flags or {})
    config = {**StableDiffusionRun.added_fields, **probe_config, "data_path": data_path,
              "sd15": sd15 or probe_config["sd15"], "tokenizer": tokenizer or probe_config["tokenizer"],
              "gradient_checkpointing": False}
    run = StableDiffusionRun(config)
    task, base = config["task"], run.base
    probe, tap_mode = trained_probe(probe_path, config, base.unet)
    reward = control_model(task, reward_path, config["num_classes"])
    models = {"sd15": None}
    if controlnet_path:
        controlnet = ControlNet.from_unet(base.unet, hint_channels=3, hint_downsampling=base.vae.downsampling_factor)
        models["controlnet"] = sd_checkpoints.load(controlnet, controlnet_path).requires_grad_(False).eval()
    for network in (base, probe, reward, *filter(None, models.values())):
        network.to(device)
    dataset = run.make_dataset()
    count = min(num_images, len(dataset))
    images, hints, controls, tokens = run.collate([dataset[index] for index in range(count)])
    latents = base.encode(images.to(device), SampleDraws(range(count)))  # (N, 4, S/8, S/8)
    batch = latents, tokens.to(device), controls.to(device), hints.to(device)
    curves = {}
    for name, controlnet in models.items():
        rows = errors_across_t(base, controlnet, probe, tap_mode, lambda x0: reward(base.decode(x0)), run.schedule,
                               task, batch, timesteps, seed)
        curves[name] = [{key: row[key] for key in ("t", "probe", "reward")} for row in rows]
    return curves, task


CURVE_COLOURS = {("sd15", "probe"): (120, 160, 240), ("sd15", "reward"): (240, 150, 130),
                 ("controlnet", "probe"): (30, 70, 200), ("controlnet", "reward"): (200, 40, 30)}
READERS = {"probe": "probe on decoder features", "reward": "reward model on one-step x0"}


def fig2_chart(curves, task):
    """Fig. 2's line chart: the task's curve metric across t, probe and reward model, for each model. -> PIL image"""
    metric = CURVE_METRICS[task]
    series = {f"{name}: {READERS[reader]}": (CURVE_COLOURS[name, reader], [(row["t"], row[reader][metric])
                                                                            for row in rows])
              for name, rows in curves.items() for reader in READERS}
    return line_chart(series, f"control {metric} vs timestep t", size=(640, 380),
                      margin=16 + 14 * len(series))  # the legend above the plot
