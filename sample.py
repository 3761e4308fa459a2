"""Sample a trained DiT / SiT with Internal Guidance and / or CFG, each on its own interval of t; or a ControlNet run.

    python sample.py runs/shapes-tiny [--num-samples 64] [--seed 0] [--batch-size 32] [--sampler em|heun|ddpm|ddim]
                     [--steps N] [--ig W] [--ig-interval LO HI] [--cfg S] [--cfg-interval LO HI] [--out DIR]
    python sample.py SiT-XL-2-IG.pt --model DiT-XL/2 --intermediate-block 8 --ig 1.4 --cfg 1.35 --cfg-interval 0 0.7
    python sample.py runs/shapes-innercontrol-depth --num-samples 200 --seeds-per-control 2 --cfg 3 --steps 20
    torchrun --nproc_per_node=N sample.py ...

RUN is a run folder (its latest.pt) or a checkpoint of train.py; its EMA weights are used (--weights model: the raw
ones). With --model PRESET, RUN is an official DiT or IG-release SiT checkpoint (ref.dit.load_checkpoint), described by
--image-size, --num-classes, --learn-sigma, --intermediate-block and --objective (the official SiT checkpoints run time
the other way, t = 0 noise, and do not sample correctly here).
Flow models (t = 1 noise -> 0 data): Euler-Maruyama, the IG default (250 steps on the grid 1 -> 0.04, then a mean step
to 0), or Heun on a uniform grid. Eps models: DDPM ancestral (every one of the 1000 steps) or DDIM. Guidance goes
through ref.guidance.guided_denoiser; intervals are in t in [0, 1] (t = 1 noise; for eps models t = timestep / 1000).
Sample i has label i mod num_classes (or --class-label) and its own generator, seeded with seed + i, for its initial
noise and every step's noise: the samples do not depend on the batch size or the number of ranks (up to float32
rounding: CPU matmul kernels round differently for different row counts, ~1e-7, which can move a rare pixel by one
level; on this machine the tests' 7 samples came out bitwise equal). Rank r takes samples
r, r + W, r + 2W, ...; rank 0 gathers them and writes OUT/samples.npz (ADM: arr_0 uint8 N x H x W x 3, arr_1 labels),
OUT/grid.png and OUT/settings.json. Latent models write OUT/latents.npy (N, 4, h, w) divided by the VAE scale factor,
ready for the SD-VAE decoder, which this repository does not include yet, and OUT/labels.npy instead of images.

A controlnet run of the InnerControl pipeline (train.py --config shapes-controlnet / shapes-innercontrol) samples
its base UNet steered by the ControlNet: DDIM (50 steps by default) with CFG on the caption (--cfg, the control in both
branches). Sample i follows the control and caption of evaluation scene i // --seeds-per-control (Shapes seed
ref.innercontrol.EVAL_SCENE_SEED) from noise seeded with seed + i; arr_1 holds the scene indices, grid.png shows each
control beside its samples; `eval.py innercontrol` scores them.
Bad input: a message and exit status 2, nothing written.
"""
import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ref import jobs, training
from ref.data import SD_VAE_SCALE_FACTOR, Shapes
from ref.dit import MODELS, load_checkpoint
from ref.guidance import guided_denoiser
from ref.innercontrol import EVAL_SCENE_SEED, generate
from ref.samplers import ddim, ddpm_ancestral, euler_maruyama, heun, spaced_timesteps, uniform_grid
from ref.schedules import DDPMSchedule

SAMPLERS = {"flow": ("em", "heun"), "eps": ("ddpm", "ddim")}  # the first is the default
DEFAULT_STEPS = {"em": 250, "heun": 50, "ddim": 50}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder (uses its latest.pt) or checkpoint file")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--class-label", type=int, help="one label for every sample (default: i mod num_classes)")
    parser.add_argument("--sampler", choices=sum(SAMPLERS.values(), ()), help="default: em (flow), ddpm (eps)")
    parser.add_argument("--steps", type=int, help="em 250, heun 50, ddim 50 by default; ddpm takes every step")
    parser.add_argument("--eta", type=float, default=0.0, help="ddim: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--ig", type=float, default=1.0, help="IG weight w: D_i + w (D_f - D_i); 1 = off")
    parser.add_argument("--ig-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    parser.add_argument("--cfg", type=float, default=1.0, help="CFG weight s; 1 = off")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    parser.add_argument("--bf16", action="store_true", help="CUDA: run the network under bf16 autocast")
    parser.add_argument("--grid-rows", type=int, default=8, help="rows of grid.png (the first samples)")
    parser.add_argument("--seeds-per-control", type=int, default=1,
                        help="controlnet runs: samples per evaluation scene (sample i follows scene i // this)")
    parser.add_argument("--out", help="output folder (default: samples-<settings> beside the checkpoint)")
    foreign = parser.add_argument_group("foreign checkpoints (official DiT, IG-release SiT)")
    foreign.add_argument("--model", choices=list(MODELS), help="size preset; RUN is then a foreign checkpoint")
    foreign.add_argument("--image-size", type=int, default=256, help="image side; the latents are 1/8 of it")
    foreign.add_argument("--num-classes", type=int, default=1000)
    foreign.add_argument("--learn-sigma", action="store_true", help="official DiT / SiT checkpoints: True")
    foreign.add_argument("--intermediate-block", type=int, help="IG head after this block (IG release XL: 8)")
    foreign.add_argument("--objective", choices=tuple(SAMPLERS), default="flow")
    return parser.parse_args(argv)


def checkpoint_file(run):
    """The checkpoint of RUN: the file itself, or a run folder's latest.pt."""
    path = Path(run)
    path = path / "latest.pt" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    return path


def default_out(path, tag):
    """samples-TAG beside the checkpoint; for any file but latest.pt (a snapshot) samples-<its name>-TAG."""
    return path.parent / ("samples-" + ("" if path.name == "latest.pt" else path.stem + "-") + tag)


def load_model(args, path, checkpoint):
    """-> (model with the chosen weights, description: objective, beta_schedule, latent, step, config).
    checkpoint: the train.py checkpoint at path, or None for a foreign one (--model)."""
    if args.model:
        model = MODELS[args.model](input_size=args.image_size // jobs.LATENT_DOWNSAMPLING,
                                   in_channels=jobs.LATENT_CHANNELS, num_classes=args.num_classes,
                                   learn_sigma=args.learn_sigma, intermediate_block=args.intermediate_block)
        load_checkpoint(model, jobs.read_checkpoint_file(path), prefer=args.weights)
        return model, dict(objective=args.objective, beta_schedule="linear", latent=True, step=None, config=None,
                           checkpoint=str(path))
    model, config = jobs.load_trained(path, "dit", args.weights, checkpoint)
    return model, dict(objective=config["objective"], beta_schedule=config["beta_schedule"],
                       latent=config["data"] == "latents", step=checkpoint["step"], config=config,
                       checkpoint=str(path))


def make_sampler(args, objective, beta_schedule):
    """-> (run(denoise, noise, draws) -> x0 (N, C, H, W) float64, network passes per sample, the factor from t in
    [0, 1] to the model's time (1 for flow models, T for DDPM))."""
    sampler = args.sampler or SAMPLERS[objective][0]
    if sampler not in SAMPLERS[objective]:
        raise ValueError(f"sampler {sampler} does not fit a {objective} model; choose one of {SAMPLERS[objective]}")
    if sampler == "ddpm" and args.steps is not None:
        raise ValueError("ddpm takes every one of the 1000 steps; for fewer, use --sampler ddim --steps N")
    steps = args.steps or DEFAULT_STEPS.get(sampler)
    if sampler == "em":
        grid = uniform_grid(steps)  # SiT / IG: `steps` points 1 -> 0.04, then the deterministic mean step to 0

        def run(denoise, noise, draws):
            return euler_maruyama(denoise, noise, grid, randn_like=draws.randn_like)
        return run, steps, 1.0
    if sampler == "heun":
        grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64)  # uniform in t; the last step is Euler

        def run(denoise, noise, draws):
            return heun(denoise, noise, grid)
        return run, 2 * steps - 1, 1.0
    schedule = DDPMSchedule.named(beta_schedule)
    if sampler == "ddim":
        timesteps = spaced_timesteps(schedule, steps)

        def run(denoise, noise, draws):
            return ddim(denoise, noise, schedule, timesteps, eta=args.eta, randn_like=draws.randn_like)
        return run, steps, schedule.num_timesteps

    def run(denoise, noise, draws):
        return ddpm_ancestral(denoise, noise, schedule, randn_like=draws.randn_like)
    return run, schedule.num_timesteps, schedule.num_timesteps


def check_guidance(args, model):
    if args.ig != 1.0 and model.intermediate_head is None:
        raise ValueError("--ig needs a model with the IG intermediate head (this one has none)")
    if args.cfg != 1.0 and model.class_dropout_prob == 0:
        raise ValueError("--cfg needs a model trained with label dropout (this one has no null label)")
    if args.class_label is not None and not 0 <= args.class_label < model.num_classes:
        raise ValueError(f"--class-label must be in [0, {model.num_classes}), got {args.class_label}")


def to_uint8(x):
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, as DiT's sample_ddp.py: clamp(127.5 x + 128, 0, 255)."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_image(images, columns):
    """(N, H, W, 3) uint8 -> one (rows H, columns W, 3) image, row-major, the last row padded with black."""
    n, height, width, _ = images.shape
    rows = -(-n // columns)
    padded = np.zeros((rows * columns, height, width, 3), dtype=np.uint8)
    padded[:n] = images
    return padded.reshape(rows, columns, height, width, 3).transpose(0, 2, 1, 3, 4).reshape(rows * height, -1, 3)


def sample_labels(indices, args, num_classes):
    """Label of sample i: --class-label, else i mod num_classes (classes balanced). (n,) int64"""
    return indices % num_classes if args.class_label is None else np.full(len(indices), args.class_label)


def sample_share(args, model, latent, run_sampler, interval_scale, dist):
    """This rank's samples r, r + W, ... -> (indices, outputs): uint8 images (n, H, W, 3) or latents (n, C, h, w)."""
    indices = np.arange(dist.rank, args.num_samples, dist.world_size)
    shape = (model.in_channels, model.input_size, model.input_size)
    outputs = [np.zeros((0, *shape), np.float32) if latent else np.zeros((0, *shape[1:], 3), np.uint8)]
    for start in range(0, len(indices), args.batch_size):
        batch = indices[start:start + args.batch_size]
        draws = training.SampleDraws(args.seed + int(i) for i in batch)
        labels = torch.as_tensor(sample_labels(batch, args, model.num_classes), device=dist.device)
        denoise = guided_denoiser(model, labels, model.num_classes, w_ig=args.ig, w_cfg=args.cfg,
                                  ig_interval=[interval_scale * t for t in args.ig_interval],
                                  cfg_interval=[interval_scale * t for t in args.cfg_interval])
        with training.autocast(dist.device, args.bf16):
            x = run_sampler(denoise, draws.randn(*shape).to(dist.device), draws).float().cpu()  # (n, C, H, W)
        outputs.append((x / SD_VAE_SCALE_FACTOR).numpy() if latent else to_uint8(x))
    return indices, np.concatenate(outputs)


def gather_in_order(share):
    """Every rank's (indices, samples) share -> on rank 0 all samples in sample order; None elsewhere."""
    shares = training.gather_to_main(share)
    if shares is None:
        return None
    indices = np.concatenate([indices for indices, _ in shares])  # rank order -> sample order
    return np.concatenate([samples for _, samples in shares])[np.argsort(indices)]


def write_outputs(out, samples, labels, settings, columns, rows, pictures=None):
    """pictures: what grid.png shows, (N, H, W, 3) uint8 (default: the samples)."""
    out.mkdir(parents=True, exist_ok=True)
    if settings["latent"]:
        training.atomic_write(out / "latents.npy", lambda file: np.save(file, samples))
        training.atomic_write(out / "labels.npy", lambda file: np.save(file, labels))
        print("note: a VAE decoder is not part of this repository yet; wrote latents.npy (divided by the SD-VAE "
              "scale factor, ready for its decoder) and labels.npy instead of images")
    else:
        training.atomic_write(out / "samples.npz", lambda file: np.savez(file, arr_0=samples, arr_1=labels))
        grid = io.BytesIO()
        pictures = samples if pictures is None else pictures
        Image.fromarray(grid_image(pictures[:rows * columns], columns)).save(grid, format="PNG")
        training.atomic_write(out / "grid.png", lambda file: file.write(grid.getvalue()))
    training.atomic_write(out / "settings.json", lambda file: file.write(json.dumps(settings, indent=2).encode()))


# ---------------------------------------------------------------------------------------------------------------------
# ControlNet runs (the InnerControl pipeline): controls and captions of held-out shapes scenes
# ---------------------------------------------------------------------------------------------------------------------

def load_controlnet(args, path, checkpoint):
    """-> (base, controlnet, config) for a controlnet run; its base is the run's `base`."""
    if (args.sampler or "ddim") != "ddim" or args.ig != 1.0:
        raise ValueError("a controlnet run samples with DDIM (--sampler ddim) and caption CFG (--cfg); it has no IG")
    controlnet, config = jobs.load_trained(path, "controlnet", args.weights, checkpoint)
    base, _ = jobs.load_trained(config["base"], "unet")
    return base, controlnet, config


def controlnet_share(args, base, controlnet, config, world):
    """This rank's samples r, r + W, ...: sample i follows the control and caption of evaluation scene
    i // seeds_per_control, from noise seeded with seed + i. -> (indices, images (n, H, W, 3) uint8)"""
    scenes = Shapes(config["image_size"], num_items=args.num_samples, seed=EVAL_SCENE_SEED)
    schedule = DDPMSchedule.named(config["beta_schedule"])
    indices = np.arange(world.rank, args.num_samples, world.world_size)
    outputs = [np.zeros((0, config["image_size"], config["image_size"], 3), np.uint8)]
    for start in range(0, len(indices), args.batch_size):
        batch = indices[start:start + args.batch_size]
        samples = [scenes[int(i) // args.seeds_per_control] for i in batch]
        _, tokens, control = jobs.collate_shapes(samples, config["task"])
        draws = training.SampleDraws(args.seed + int(i) for i in batch)
        hint = jobs.hint_of(control, config["task"]).to(world.device)
        noise = draws.randn(3, config["image_size"], config["image_size"]).to(world.device)
        with training.autocast(world.device, args.bf16):
            images = generate(base, controlnet, schedule, hint, tokens.to(world.device), noise,
                              args.steps or DEFAULT_STEPS["ddim"], args.cfg)
        outputs.append(to_uint8(images.cpu()))
    return indices, np.concatenate(outputs)


def control_pictures(samples, scene_indices, config, seeds_per_control):
    """grid.png rows: each control as a picture, then its samples. -> (N', H, W, 3) uint8"""
    scenes = Shapes(config["image_size"], num_items=int(scene_indices.max()) + 1, seed=EVAL_SCENE_SEED)
    rows = []
    for start in range(0, len(samples), seeds_per_control):
        control = jobs.control_of(scenes[int(scene_indices[start])], config["task"])
        rows += [jobs.control_picture(control, config["task"]), *samples[start:start + seeds_per_control]]
    return np.stack(rows)


def sample_controlnet(args, path, base, controlnet, config):
    with training.distributed() as world:
        base.to(world.device), controlnet.to(world.device)
        start = time.perf_counter()
        samples = gather_in_order(controlnet_share(args, base, controlnet, config, world))
        if not world.is_main:
            return
        steps = args.steps or DEFAULT_STEPS["ddim"]
        scene_indices = np.arange(args.num_samples) // args.seeds_per_control
        settings = dict(vars(args), job="controlnet", task=config["task"], scene_seed=EVAL_SCENE_SEED, latent=False,
                        sampler="ddim", steps=steps, checkpoint=str(path), config=config,
                        network_evaluations_per_sample=steps * (2 if args.cfg != 1.0 else 1),
                        seconds=time.perf_counter() - start, world_size=world.world_size, device=str(world.device))
        tag = f"ddim{steps}-cfg{args.cfg:g}-seed{args.seed}-n{args.num_samples}x{args.seeds_per_control}"
        out = Path(args.out) if args.out else default_out(path, tag)
        write_outputs(out, samples, scene_indices, settings, 1 + args.seeds_per_control, args.grid_rows,
                      control_pictures(samples, scene_indices, config, args.seeds_per_control))
        print(f"wrote {args.num_samples} samples to {out} ({settings['seconds']:.1f} s, "
              f"{settings['network_evaluations_per_sample']} network evaluations each)")


def main(argv=None):
    args = parse_args(argv)
    try:  # bad input stops here, before anything is written
        path = checkpoint_file(args.run)
        checkpoint = None if args.model else jobs.read_run_checkpoint(path)
        controlled = checkpoint is not None and checkpoint["args"]["job"] == "controlnet"
        if controlled:
            networks = load_controlnet(args, path, checkpoint)
        else:
            model, spec = load_model(args, path, checkpoint)
            run_sampler, passes, interval_scale = make_sampler(args, spec["objective"], spec["beta_schedule"])
            check_guidance(args, model)
    except ValueError as error:
        training.exit_with_error(error)
    if controlled:
        return sample_controlnet(args, path, *networks)
    with training.distributed() as dist:
        model.to(dist.device).eval()
        start = time.perf_counter()
        samples = gather_in_order(sample_share(args, model, spec["latent"], run_sampler, interval_scale, dist))
        if not dist.is_main:
            return
        sampler = args.sampler or SAMPLERS[spec["objective"]][0]
        settings = dict(vars(args), **spec, sampler=sampler, steps=args.steps or DEFAULT_STEPS.get(sampler),
                        network_evaluations_per_sample=passes * (2 if args.cfg != 1.0 else 1),
                        seconds=time.perf_counter() - start, world_size=dist.world_size, device=str(dist.device))
        tag = f"{sampler}{settings['steps'] or ''}-ig{args.ig:g}-cfg{args.cfg:g}-seed{args.seed}-n{args.num_samples}"
        out = Path(args.out) if args.out else default_out(path, tag)
        columns = model.num_classes if model.num_classes <= 16 else 8
        write_outputs(out, samples, sample_labels(np.arange(args.num_samples), args, model.num_classes), settings,
                      columns, args.grid_rows)
        print(f"wrote {args.num_samples} samples to {out} ({settings['seconds']:.1f} s, "
              f"{settings['network_evaluations_per_sample']} network evaluations each)")


if __name__ == "__main__":
    main()
