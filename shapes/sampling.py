"""Sampling a controlnet run of the InnerControl pipeline (sample.py RUN on a shapes-controlnet / shapes-innercontrol
run): its base UNet steered by the ControlNet (shapes.evaluation.generate: DDIM, caption CFG), each sample following
the control and caption of a held-out evaluation scene (shapes.evaluation.evaluation_scenes) from noise seeded per
sample.
"""
import numpy as np

from ref import runtime
from ref.data import to_uint8
from ref.schedules import DDPMSchedule
from shapes import pipeline, runs
from shapes.evaluation import evaluation_scenes, generate


def drawn_after(folder, run):
    """Whether the folder holds samples (samples.npz) written after RUN's checkpoint (a run folder's latest.pt, or the
    file) was: a rerun reuses them, and draws them again from a run trained further since (resuming to more steps
    rewrites the checkpoint)."""
    samples = folder / "samples.npz"
    return samples.exists() and samples.stat().st_mtime_ns >= runtime.checkpoint_file(run).stat().st_mtime_ns


def load_controlnet(path, weights="ema", checkpoint=None):
    """-> (base, controlnet, config) for a controlnet run; its base is the run's `base`."""
    controlnet, config = runs.load_trained(path, "controlnet", weights, checkpoint)
    base, _ = runs.load_trained(config["base"], "unet")
    return base, controlnet, config


def controlnet_share(base, controlnet, config, world, num_samples, steps, cfg_scale, seeds_per_control=1, seed=0,
                     batch_size=32, bf16=False, eta=0.0):
    """This rank's samples r, r + W, ...: sample i follows the control and caption of evaluation scene
    i // seeds_per_control, from noise (and, with eta > 0, the DDIM steps' noise) seeded with seed + i. controlnet
    None: the base alone on the captions. -> (indices, images (n, H, W, 3) uint8)"""
    scenes = evaluation_scenes(config, num_samples)
    schedule = DDPMSchedule.named(config["beta_schedule"])
    indices = np.arange(world.rank, num_samples, world.world_size)
    outputs = [np.zeros((0, config["image_size"], config["image_size"], 3), np.uint8)]
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        samples = [scenes[int(i) // seeds_per_control] for i in batch]
        _, tokens, control = pipeline.collate_shapes(samples, config["task"])
        draws = runtime.SampleDraws(seed + int(i) for i in batch)
        hint = pipeline.hint_of(control, config["task"]).to(world.device)
        noise = draws.randn(3, config["image_size"], config["image_size"]).to(world.device)
        with runtime.autocast(world.device, bf16):
            images = generate(base, controlnet, schedule, hint, tokens.to(world.device), noise, steps, cfg_scale, eta,
                              draws.randn_like)
        outputs.append(to_uint8(images.cpu()))
    return indices, np.concatenate(outputs)


def control_pictures(samples, scene_indices, config, seeds_per_control):
    """grid.png rows: each control as a picture, then its samples. -> (N', H, W, 3) uint8"""
    scenes = evaluation_scenes(config, int(scene_indices.max()) + 1)
    rows = []
    for start in range(0, len(samples), seeds_per_control):
        control = pipeline.control_of(scenes[int(scene_indices[start])], config["task"])
        rows += [pipeline.control_picture(control, config["task"]), *samples[start:start + seeds_per_control]]
    return np.stack(rows)
