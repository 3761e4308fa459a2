"""The device check (issue 25): every CUDA path of the repository run once, sized for under 8 minutes on one H100 /
H200, its figures in one JSON and a markdown table. --cpu-smoke runs the same functions on tiny configs on the CPU in
about a minute (the tests run it, so the check does not rot between GPU windows).

    python -m bench.gpu_check [--out gpu-check] [--only SECTION ...] [--budget 480]   # OUT/gpu-check.json, .md
    python -m bench.gpu_check --cpu-smoke [--skip torchrun] [--out DIR]               # tiny configs on the CPU

Sections, in this order, each under a time cap (CAPS, in seconds; a part that would start past its section's cap or
past --budget is recorded as skipped). The JSON and the table are rewritten after every part, so a killed run keeps
what it finished; a part that fails records its error and the check goes on.
  correctness  DiT/SiT-XL/2 and LightningDiT-XL/1 (both heads), the SD1.5 UNet steered by a ControlNet (32 x 32
               latents, a 256 px hint), the SD VAE decoder and the FID Inception (pytorch-fid's resize: the TF1 one
               is float32 by design), at random weights (parameters initialised to zero drawn at random, so no
               output is trivially 0): relative L2 error of the device in float32 (TF32 off), in TF32 (as training
               and sampling run on CUDA) and under bf16 autocast, against the same inputs in float64 on the CPU;
               bf16 also against the device's float32. Tolerances: TOLERANCES.
  training     DiT-XL/2 and LightningDiT-XL/1 at 256 px (latents 4 x 32 x 32, 32 x 16 x 16), bf16 autocast, the
               largest batch of TRAINING_BATCHES that fits (<= 256), plain and torch.compile'd at that batch:
               the training step of bench/dit_speed.py (loss with the IG term, backward, clipping, AdamW, EMA),
               fastest of a few steps; images/s; MFU = FLOPs counted by torch.utils.flop_counter per image x images/s
               / the device's dense bf16 peak (ref/runtime.peak_flops); peak memory; the first step's time (with the
               compilation).
  controlnet   one SD1.5 ControlNet training step at 512 px, batch 8, bf16 autocast (bench/innercontrol_sd_step.py:
               VAE encode, ControlNet + UNet, backward, clipping; no AdamW), depth task: the diffusion loss alone,
               + reward (decode + DPT-Hybrid), + reward + alignment (Eq. 8), each without and with gradient
               checkpointing: step time and peak memory, beside the counted lower bound of bench/sd_training_memory.py
               (eps loss and reward decode only; frozen networks counted in bf16).
  sampling     SiT-XL/2 with IG 1.4 + CFG 1.35 on [0, 0.7], 250 Euler-Maruyama steps (the IG release's gen.sh) and
               LightningDiT-XL/1 with IG 1.4 + CFG 1.45 on [0, 0.81], Heun 124 steps, bf16, through ref/sampling.py's
               sample_share and sample.py's streaming FID hook (ref.metrics.ImageFeatures), random weights: one
               guided evaluation timed at each batch of SAMPLING_BATCHES (the best per image is used); the IG
               overhead of an evaluation (IG + CFG against CFG alone, same batch); a short run of the sampler (a few
               steps) without and with VAE decode + Inception features; the network evaluations of the full run,
               counted by the real sampler around a stand-in network; so the time per image and per 50K samples =
               sampler (scaled from the short run by the evaluation count) + decode + Inception, and the FID
               overhead against sampling alone.
  torchrun     `torchrun --nproc_per_node=1 train.py` (NCCL on CUDA, gloo on the CPU) on a small config: an
               uninterrupted run; the same run killed (SIGKILL) once its first checkpoint is on disk and rerun with
               the same command; the final weights compared (sha256 of the state, largest difference) and the
               losses logged after the resume point; a second uninterrupted run says whether the kernels are
               deterministic at all (when they are not, the resumed run cannot be bitwise either).
--cpu-smoke: the same functions on the CPU at tiny sizes (`sizes`): 2-block DiT / LightningDiT on 4 x 4 latents, the
tiny SD UNet / VAE / DPT at 32 px, batch 2-4, torch.compile with the "eager" backend (dynamo's graph capture without
inductor's code generation), two of the three ControlNet variants, the Inception's bf16 pass left out (the CPU has no
bf16 convolution kernels: ~40 s), torchrun with gloo on 6 steps. Its figures mean nothing; its rows prove the paths.
Goals reported against (`goals`): DiT-XL/2 bf16 training >= 50% MFU (40% at least); IG overhead <= 1% of a sampling
step; 50K SiT-XL/2 + IG + CFG samples with FID in <= 90 minutes on one H200.
"""
import argparse
import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import nn

from bench import dit_speed, innercontrol_sd_step, sd_training_memory
from ref import runtime
from ref.checkpoints import read_checkpoint
from ref.controlnet import ControlNet
from ref.dit import DiT, MODELS
from ref.inception import FIDInceptionV3
from ref.innercontrol_sd import SD_SIZES
from ref.lightningdit import MODELS as LIGHTNINGDIT_MODELS
from ref.metrics import ImageFeatures
from ref.sampling import SampleSettings, foreign_spec, make_sampler, sample_share
from ref.unet import UNet
from ref.vae import MODELS as VAE_MODELS

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("correctness", "training", "controlnet", "sampling", "torchrun")
CAPS = {"correctness": 45, "training": 180, "controlnet": 90, "sampling": 100, "torchrun": 60}  # s, 475 in all
TOLERANCES = {"fp32 vs fp64": 1e-4, "tf32 vs fp64": 1e-2, "bf16 vs fp32": 5e-2}  # relative L2 error
TRAINING_BATCHES = (256, 192, 128, 96, 64, 32, 16)
SAMPLING_BATCHES = (64, 128, 256)
SAMPLES_FOR_FID = 50_000
GIB = 2 ** 30
CONTROLNET_VARIANTS = ("diffusion only", "+ reward", "+ reward + alignment")  # bench/innercontrol_sd_step.py's


class Network(NamedTuple):
    """A network of the check: its name, a builder (random weights, on the default device), the checkpoint kind it
    samples as (ref.sampling.CHECKPOINT_KINDS), its latents' shape (C, S, S) and their VAE (ref.vae.MODELS)."""
    name: str
    build: object
    kind: str
    latent: tuple
    vae: str


def sizes(smoke):
    """What each section runs: the real sizes, or the CPU smoke's tiny ones (the same code paths)."""
    if smoke:
        dit = Network("DiT-tiny/2", lambda: DiT(input_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                                                num_classes=10, intermediate_block=1), "ig-sit", (4, 4, 4), "tiny")
        lightningdit = Network("LightningDiT-tiny/1", lambda: LIGHTNINGDIT_MODELS["LightningDiT-tiny/1"](
            input_size=4, in_channels=4, num_classes=10, intermediate_block=1), "ig-lightningdit", (4, 4, 4), "tiny")
        # The CPU has no bf16 convolution kernels: the Inception's bf16 pass would take ~40 s there.
        return dict(networks=(dit, lightningdit), sd_size="tiny", sd_latent=4, vae="tiny", dpt="tiny-hybrid",
                    no_bf16=("FID Inception",), controlnet_variants=CONTROLNET_VARIANTS[::2],
                    memory_architecture="tiny", image_size=32, sd_batch=2, sd_rounds=1, training_batches=(4, 2),
                    training_rounds=1, compile_backend="eager", sampling_batches=(2, 3), short_steps=2,
                    torchrun=["--config", "shapes-tiny", "--depth", "2", "--hidden-size", "32", "--batch-size", "4",
                              "--steps", "6", "--checkpoint-every", "2", "--log-every", "1", "--workers", "0"])
    dit = Network("DiT-XL/2 (SiT-XL/2)", lambda: MODELS["SiT-XL/2"](input_size=32, in_channels=4,
                                                                      intermediate_block=8), "ig-sit", (4, 32, 32), "sd")
    lightningdit = Network("LightningDiT-XL/1", lambda: LIGHTNINGDIT_MODELS["LightningDiT-XL/1"](intermediate_block=8),
                           "ig-lightningdit", (32, 16, 16), "vavae-f16d32")
    return dict(networks=(dit, lightningdit), sd_size="sd15", sd_latent=32, vae="sd", dpt="dpt-hybrid-midas",
                no_bf16=(), controlnet_variants=CONTROLNET_VARIANTS,
                memory_architecture="sd15", image_size=512, sd_batch=8, sd_rounds=2,
                training_batches=TRAINING_BATCHES, training_rounds=4, compile_backend="inductor",
                sampling_batches=SAMPLING_BATCHES, short_steps=8,
                torchrun=["--config", "shapes-tiny", "--steps", "300", "--checkpoint-every", "100", "--log-every",
                          "50"])


# ---------------------------------------------------------------------------------------------------------------------
# The report: one JSON and one markdown table, rewritten after every part
# ---------------------------------------------------------------------------------------------------------------------

class Report:
    """The figures so far, section by section, with the goals read off them; write() rewrites both files."""

    def __init__(self, out, device, smoke):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        threads = f"CPU ({torch.get_num_threads()} threads)"
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
        self.data = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=name, smoke=smoke,
                         torch=torch.__version__, sections={}, goals={})

    def add(self, section, row):
        self.data["sections"].setdefault(section, []).append(row)
        self.data["goals"] = goals(self.data["sections"])
        self.write()

    def write(self):
        text = json.dumps(self.data, indent=2)
        runtime.atomic_write(self.out / "gpu-check.json", lambda file: file.write(text.encode()))
        table = markdown(self.data)
        runtime.atomic_write(self.out / "gpu-check.md", lambda file: file.write(table.encode()))


def shown(value):
    if isinstance(value, dict):
        return ", ".join(f"{key}: {shown(item)}" for key, item in value.items())
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e3 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown(data):
    lines = [f"Device check, {data['date']}, {data['device']}, torch {data['torch']}"
             + (" (CPU smoke: tiny configs, the figures mean nothing)" if data["smoke"] else "")]
    for section, rows in data["sections"].items():
        columns = list(dict.fromkeys(key for row in rows for key in row))
        lines += ["", f"### {section}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(shown(row.get(key)) for key in columns) + " |" for row in rows]
    lines += ["", "### goals", "", "| goal | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {goal} | {shown(value)} | {shown(met)} |" for goal, (value, met) in data["goals"].items()]
    return "\n".join(lines) + "\n"


def goals(sections):
    """The issue's goals against the figures so far: {goal: (measured, met)}; absent figures give (None, None)."""
    def first(section, **match):
        return next((row for row in sections.get(section, []) if all(row.get(k) == v for k, v in match.items())
                     and "error" not in row and "skipped" not in row), {})
    dit = [row.get("mfu") for row in sections.get("training", []) if row.get("network", "").startswith("DiT-XL/2")
           and row.get("mfu") is not None]
    sit = first("sampling", network="DiT-XL/2 (SiT-XL/2)")
    best_mfu = max(dit) if dit else None
    minutes = sit.get("minutes_per_50k_with_fid")
    overhead = sit.get("ig_overhead")
    return {"DiT-XL/2 bf16 training MFU >= 50% (40% at least)":
            (best_mfu, None if best_mfu is None else "yes" if best_mfu >= 0.5 else "40%+" if best_mfu >= 0.4 else "no"),
            "IG overhead <= 1% of a sampling step": (overhead, None if overhead is None else overhead <= 0.01),
            "50K SiT-XL/2 + IG + CFG samples with FID <= 90 min (H200)": (minutes, None if minutes is None
                                                                          else minutes <= 90)}


class Clock:
    """The check's time: a section's deadline is its cap from its start, and never past the whole budget."""

    def __init__(self, budget):
        self.end = time.monotonic() + budget

    def section(self, cap):
        deadline = min(time.monotonic() + cap, self.end)
        return lambda: time.monotonic() > deadline


def parts(report, section, items, past_deadline):
    """Yield each (name, item) to run, recording a skip past the deadline; an exception inside the body is recorded
    as that part's error (the with-block of `attempt`)."""
    for name, item in items:
        if past_deadline():
            report.add(section, dict(part=name, skipped="time cap"))
            continue
        yield name, item


@contextlib.contextmanager
def attempt(report, section, name):
    try:
        yield
    except Exception as error:  # the check goes on; the error is its finding
        report.add(section, dict(part=name, error=f"{type(error).__name__}: {error}"[:500]))
        traceback.print_exc()


def synchronise(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------------------------
# correctness: the device against float64 on the CPU, bf16 against float32
# ---------------------------------------------------------------------------------------------------------------------

def random_zero_inits(module, seed=0, std=0.02):
    """Parameters initialised to zero (adaLN, output layers, zero convs) drawn from N(0, std^2) instead, so that no
    output is trivially 0. -> module"""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator))
    return module


class SteeredUNet(nn.Module):
    """The SD1.5 UNet steered by a ControlNet copied from it: (x, hint, t, context) -> eps."""

    def __init__(self, sd_size):
        super().__init__()
        self.unet = UNet(**SD_SIZES[sd_size]["unet"])
        self.controlnet = ControlNet.from_unet(self.unet)

    def forward(self, x, hint, t, context):
        return self.unet(x, t, context, control=self.controlnet(x, hint, t, context))


def correctness_cases(config):
    """(name, network builder, inputs, call -> one flat output) of every network the check compares."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)
    cases = []
    for network in config["networks"]:
        x, t = randn(2, *network.latent), torch.rand(2, generator=generator)
        cases.append((network.name, network.build, (x, t, torch.tensor([1, 3])),
                      lambda net, x, t, y: torch.cat([out.flatten() for out in net(x, t, y)])))  # both heads
    latent, side = config["sd_latent"], 8 * config["sd_latent"]
    context_dim = SD_SIZES[config["sd_size"]]["unet"]["context_dim"]
    cases.append((f"{config['sd_size']} UNet + ControlNet", lambda: SteeredUNet(config["sd_size"]),
                  (randn(1, 4, latent, latent), torch.rand(1, 3, side, side, generator=generator),
                   torch.tensor([500]), randn(1, 77, context_dim)), lambda net, *inputs: net(*inputs)))
    vae = VAE_MODELS[config["vae"]]
    cases.append((f"{config['vae']} VAE decoder", vae, (randn(1, 4, latent // 2, latent // 2),),
                  lambda net, z: net.decode(z)))
    cases.append(("FID Inception", lambda: FIDInceptionV3(random_weights=True, resize="pytorch"),  # tf1: float32
                  (torch.rand(1, 3, 64, 64, generator=generator),),
                  lambda net, images: torch.cat(list(net(images).values()), dim=1)))
    return cases


@contextlib.contextmanager
def fp32_precision(device, precision):
    """CUDA float32 matmuls and convolutions in `precision` ("ieee" or "tf32") inside the block."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def relative_error(output, reference):
    output, reference = output.detach().double().cpu(), reference.detach().double().cpu()
    return float((output - reference).norm() / reference.norm())


def correctness(device, config, report, past_deadline):
    for name, (build, inputs, call) in parts(report, "correctness", [(case[0], case[1:])
                                                                      for case in correctness_cases(config)],
                                             past_deadline):
        with attempt(report, "correctness", name), torch.inference_mode():
            torch.manual_seed(0)
            network = random_zero_inits(build().eval())
            as_double = [x.double() if x.is_floating_point() else x for x in inputs]
            reference = call(copy.deepcopy(network).double(), *as_double)  # float64 on the CPU
            network.to(device)
            on_device = [x.to(device) for x in inputs]
            with fp32_precision(device, "ieee"):
                outputs = {"fp32": call(network, *on_device)}
            with fp32_precision(device, "tf32"):  # the CPU has no TF32: the same as fp32 there
                outputs["tf32"] = call(network, *on_device) if device.type == "cuda" else outputs["fp32"]
            if name not in config["no_bf16"]:
                with fp32_precision(device, "tf32"), torch.autocast(device.type, dtype=torch.bfloat16):
                    outputs["bf16"] = call(network, *on_device)
            errors = {"fp32 vs fp64": relative_error(outputs["fp32"], reference),
                      "tf32 vs fp64": relative_error(outputs["tf32"], reference)}
            if "bf16" in outputs:
                errors.update({"bf16 vs fp64": relative_error(outputs["bf16"], reference),
                               "bf16 vs fp32": relative_error(outputs["bf16"], outputs["fp32"])})
            within = all(errors[key] <= tolerance for key, tolerance in TOLERANCES.items() if key in errors)
            report.add("correctness", dict(part=name, **errors, within_tolerance=within))
            del network


# ---------------------------------------------------------------------------------------------------------------------
# training: step time, images/s, MFU, memory of DiT-XL/2 and LightningDiT-XL/1, plain and compiled
# ---------------------------------------------------------------------------------------------------------------------

def training_setup(network, device, batch, compile_backend=None):
    """The network, its EMA and AdamW on the device, and bench/dit_speed.py's (forward_backward, training_step) at
    `batch`, the forward through torch.compile when a backend is given."""
    with device:  # initialised where it runs: an XL network's init on the CPU takes seconds a try
        model = random_zero_inits(network.build())
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    net = torch.compile(model, backend=compile_backend) if compile_backend else None
    x0 = torch.randn(batch, *network.latent, device=device)  # stands in for latents: speed does not depend on them
    y = torch.randint(model.num_classes, (batch,), device=device)
    return dit_speed.training_runs(model, ema, optimizer, x0, y, model.num_classes, runtime.autocast(device, True),
                                   net)


def first_step(network, device, batch, compile_backend=None):
    """A fresh setup's training step at `batch`, run once (compilation included). -> (step, its seconds)"""
    reset_peak(device)
    _, step = training_setup(network, device, batch, compile_backend)
    start = time.perf_counter()
    step()
    synchronise(device)
    return step, time.perf_counter() - start


def largest_batch(network, device, batches):
    """The largest of `batches` whose training step fits. -> (batch, step, first step seconds); Nones if none"""
    for batch in batches:
        try:
            return (batch, *first_step(network, device, batch))
        except torch.OutOfMemoryError:
            pass  # the failed setup is freed with the exception
        reset_peak(device)
    return None, None, None


def training(device, config, report, past_deadline):
    peak = runtime.peak_flops(device)
    for network in config["networks"]:
        fits = flops_per_image = None
        for name, compiled in parts(report, "training", [(f"{network.name} plain", False),
                                                         (f"{network.name} compiled", True)], past_deadline):
            with attempt(report, "training", name):
                if flops_per_image is None:  # counted at batch 2 before anything large is on the device
                    counting, _ = training_setup(network, device, 2)
                    flops_per_image = dit_speed.counted_flops(counting) / 2
                    del counting
                if compiled:
                    step, first = first_step(network, device, fits, config["compile_backend"]) if fits else (None,) * 2
                else:
                    fits, step, first = largest_batch(network, device, config["training_batches"])
                if fits is None:
                    report.add("training", dict(part=name, error="no batch fits"))
                    continue
                seconds = dit_speed.fastest_times([("step", step)], device, config["training_rounds"],
                                                  untimed=["step"])["step"]  # warm: its first step ran
                del step
                report.add("training", dict(
                    part=name, network=network.name, batch=fits, step_s=seconds, images_per_s=fits / seconds,
                    tflops_per_image=flops_per_image / 1e12,
                    mfu=flops_per_image * fits / seconds / peak if peak else None,
                    peak_memory_gib=peak_gib(device), first_step_s=first))


# ---------------------------------------------------------------------------------------------------------------------
# controlnet: the SD1.5 ControlNet step at 512 px, batch 8, bf16, with and without gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------------

def controlnet(device, config, report, past_deadline):
    size, batch, bounds = config["image_size"], config["sd_batch"], {}
    for checkpointing in (False, True):
        bench = None
        for variant, _ in parts(report, "controlnet", [(variant, None) for variant in config["controlnet_variants"]],
                                past_deadline):
            name = f"{variant}, checkpointing {'on' if checkpointing else 'off'}"
            with attempt(report, "controlnet", name):
                bench = bench or innercontrol_sd_step.StepBench(
                    size, config["controlnet_variants"], batch, device, config["sd_size"], config["dpt"], checkpointing)
                reset_peak(device)
                with runtime.autocast(device, True):
                    seconds = dit_speed.fastest_times([(variant, lambda: bench.step(variant, 0))], device,
                                                      config["sd_rounds"])[variant]
                reward = "reward" in variant
                if (checkpointing, reward) not in bounds:  # on meta, a few seconds of CPU a case
                    saved, recompute, counts = sd_training_memory.measure(batch, size, checkpointing, reward,
                                                                          config["memory_architecture"])
                    bounds[checkpointing, reward] = saved + recompute + sd_training_memory.weight_bytes(counts)
                bound = bounds[checkpointing, reward]
                report.add("controlnet", dict(part=name, batch=batch, image_size=size, step_s=seconds,
                                              peak_memory_gib=peak_gib(device),
                                              counted_lower_bound_gib=bound / GIB))
        del bench
        reset_peak(device)


# ---------------------------------------------------------------------------------------------------------------------
# sampling: images/s, IG overhead, time per 50K samples with VAE decode and Inception features
# ---------------------------------------------------------------------------------------------------------------------

GUIDANCE = {"ig-sit": dict(ig=1.4, cfg=1.35, cfg_interval=(0.0, 0.7)),  # the IG release's SiT-XL/2 gen.sh
            "ig-lightningdit": dict(ig=1.4, cfg=1.45, cfg_interval=(0.0, 0.81))}  # its LightningDiT inference.py


def guidance_weights(kind, ig=True):
    guidance = GUIDANCE[kind]
    return dict(w_ig=guidance["ig"] if ig else 1.0, w_cfg=guidance["cfg"], cfg_interval=guidance["cfg_interval"])


def evaluation_seconds(model, network, device, batch, ig=True):
    """Seconds per image of one guided network evaluation at t = 0.5 (inside both CFG intervals: the conditional and
    unconditional rows together), as bench/dit_speed.py times it."""
    y = torch.randint(model.num_classes, (batch,), device=device)
    options = SimpleNamespace(num_classes=model.num_classes, sampler_steps=1)
    evaluate, _ = dit_speed.guided_runs(model, y, guidance_weights(network.kind, ig), network.latent, device,
                                        options, runtime.autocast(device, True), [0, 0])
    return dit_speed.fastest_times([("eval", evaluate)], device, 2)["eval"] / batch


def timed_share(model, spec, sampler, device, settings, decoding, features=None):
    """sample_share over one batch: -> (seconds, network evaluations per sample)."""
    world = runtime.Distributed(0, 1, device)
    start = time.perf_counter()
    _, evaluations = sample_share(model, spec, sampler, world, settings, decoding,
                                  None if features is None else features.update, keep_below=0)
    synchronise(device)
    return time.perf_counter() - start, evaluations


def stand_in_network(x, t, y):
    """Zeros for both heads: the sampler's evaluation count of a full run, without the network's cost."""
    return torch.zeros_like(x), torch.zeros_like(x)


def sampling_run(network, device, config):
    """-> the sampling row of one network (see the module docstring)."""
    with device:
        model = random_zero_inits(network.build()).eval().requires_grad_(False)
    spec = foreign_spec(network.kind, network.vae)
    with device:
        vae = random_zero_inits(VAE_MODELS[network.vae]()).eval().requires_grad_(False)
    channels = network.latent[0]
    stats = ((torch.zeros(1, channels, 1, 1), torch.ones(1, channels, 1, 1))
             if spec["latent_encoding"] == "stats" else None)
    per_image = {}
    for batch in config["sampling_batches"]:
        try:
            per_image[batch] = evaluation_seconds(model, network, device, batch)
        except torch.OutOfMemoryError:
            break
    batch = min(per_image, key=per_image.get)
    without_ig = evaluation_seconds(model, network, device, batch, ig=False)
    guidance = GUIDANCE[network.kind]
    settings = SampleSettings(num_samples=batch, seed=0, batch_size=batch, labels="random", class_label=None,
                              ig=guidance["ig"], ig_interval=(0.0, 1.0), cfg=guidance["cfg"],
                              cfg_interval=guidance["cfg_interval"], bf16=True)
    integrate, sampler_network, scale, sampler, steps = make_sampler(model, spec)
    short = make_sampler(model, spec, steps=config["short_steps"])[:3]
    latents_seconds, short_evaluations = timed_share(model, spec, short, device, settings, (None, stats))
    features = ImageFeatures(FIDInceptionV3(random_weights=True).to(device), device)
    decoded_seconds, _ = timed_share(model, spec, short, device, settings, (vae, stats), features)
    one = settings._replace(num_samples=1, batch_size=1)
    _, full_evaluations = timed_share(model, spec, (integrate, stand_in_network, scale), device, one, (None, stats))
    sampler_s = latents_seconds / batch * full_evaluations / short_evaluations
    inception_s = features.seconds / batch
    decode_s = max(decoded_seconds - latents_seconds - features.seconds, 0.0) / batch
    total = sampler_s + decode_s + inception_s
    return dict(part=network.name, network=network.name, sampler=f"{sampler} {steps}", best_batch=batch,
                evaluation_ms_per_image={str(b): 1e3 * s for b, s in per_image.items()},
                ig_overhead=per_image[batch] / without_ig - 1, evaluations_per_sample=full_evaluations,
                sampler_s_per_image=sampler_s, decode_s_per_image=decode_s, inception_s_per_image=inception_s,
                images_per_s=1 / total, fid_overhead=inception_s / (sampler_s + decode_s),
                minutes_per_50k_with_fid=SAMPLES_FOR_FID * total / 60, peak_memory_gib=peak_gib(device))


def sampling(device, config, report, past_deadline):
    for name, network in parts(report, "sampling", [(network.name, network) for network in config["networks"]],
                               past_deadline):
        with attempt(report, "sampling", name):
            reset_peak(device)
            report.add("sampling", sampling_run(network, device, config))


# ---------------------------------------------------------------------------------------------------------------------
# torchrun: killed and rerun against uninterrupted
# ---------------------------------------------------------------------------------------------------------------------

def torchrun_command(flags, out):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", *flags,
            "--out", str(out)]


def train_environment(device):
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    if device.type == "cpu":
        environment.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return environment


def run_to_end(flags, out, environment, timeout):
    """-> the weights digest train.py prints at the end."""
    result = subprocess.run(torchrun_command(flags, out), cwd=REPO, env=environment, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"train.py exited {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    return re.findall(r"rank 0: weights sha256 (\w+)", result.stdout)[-1]


def descendants(pid):
    """The process ids under `pid` (children first), from /proc: torchrun starts its workers in sessions of their
    own, so the launcher's process group does not hold them."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in map(int, (task / "children").read_text().split()):
                found += [child, *descendants(child)]
    return found


def kill_after_first_checkpoint(flags, out, environment, timeout):
    """Start the run and SIGKILL its worker and launcher once latest.pt is on disk. -> the step of the latest.pt
    left (the run's total when it ended before the kill)"""
    process = subprocess.Popen(torchrun_command(flags, out), cwd=REPO, env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not (out / "latest.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in [*reversed(descendants(process.pid)), process.pid]:  # this check's own children, workers first
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    return read_checkpoint(out / "latest.pt")["step"]


def logged_losses(out):
    return {entry["step"]: entry["loss"] for entry in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def torchrun_resume(device, config, report, past_deadline):
    flags, out = config["torchrun"], Path(config["out"]) / "torchrun"
    for name, _ in parts(report, "torchrun", [("killed and rerun against uninterrupted", None)], past_deadline):
        with attempt(report, "torchrun", name):
            environment, timeout = train_environment(device), CAPS["torchrun"] * 2
            shutil.rmtree(out, ignore_errors=True)  # a run left by an earlier check would be resumed
            uninterrupted = run_to_end(flags, out / "uninterrupted", environment, timeout)
            again = run_to_end(flags, out / "again", environment, timeout)  # are the kernels deterministic?
            killed_after = kill_after_first_checkpoint(flags, out / "resumed", environment, timeout)
            resumed = run_to_end(flags, out / "resumed", environment, timeout)
            final = [read_checkpoint(out / run / "latest.pt") for run in ("uninterrupted", "resumed")]
            difference = max(float((a.double() - b.double()).abs().max())
                             for a, b in zip(final[0]["model"].values(), final[1]["model"].values()))
            losses = [logged_losses(out / run) for run in ("uninterrupted", "resumed")]
            after = [step for step in losses[1] if step > killed_after]
            report.add("torchrun", dict(
                part=name, backend="nccl" if device.type == "cuda" else "gloo", steps=final[0]["step"],
                killed_after_step=killed_after, uninterrupted_runs_bitwise_equal=uninterrupted == again,
                bitwise_equal_weights=uninterrupted == resumed,
                max_weight_difference=difference,
                equal_losses_after_resume=all(losses[0][step] == losses[1][step] for step in after)))


# ---------------------------------------------------------------------------------------------------------------------

CHECKS = {"correctness": correctness, "training": training, "controlnet": controlnet, "sampling": sampling,
          "torchrun": torchrun_resume}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny configs on the CPU: the code paths only")
    parser.add_argument("--out", default="gpu-check", help="folder of gpu-check.json, gpu-check.md, torchrun runs")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run these sections only")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=(), help="leave these sections out")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        runtime.exit_with_error("no CUDA device: the check is for a GPU (--cpu-smoke runs its code on the CPU)")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda":  # as training and sampling run (ref/runtime.distributed)
        torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    config = dict(sizes(args.cpu_smoke), out=args.out)
    report, clock = Report(args.out, device, args.cpu_smoke), Clock(args.budget)
    for section in args.only or SECTIONS:
        if section in args.skip:
            continue
        started = time.monotonic()
        CHECKS[section](device, config, report, clock.section(CAPS[section]))
        report.data.setdefault("section_seconds", {})[section] = time.monotonic() - started
        print(f"{section}: {time.monotonic() - started:.1f} s", flush=True)
    report.write()
    print(markdown(report.data))
    return report.data


if __name__ == "__main__":
    main()
