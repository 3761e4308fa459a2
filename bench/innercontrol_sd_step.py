"""Cost of InnerControl's terms at SD1.5 size: one ControlNet training step (forward, backward, gradient clipping; the
AdamW update is the same in every variant and left out) at batch 1 on the CPU with random weights, depth task:
the diffusion loss alone, + alignment (the probe on the decoder's 9 self-attention maps, Eq. 7), + reward (the one-step
x0 decoded through the VAE with gradients, checkpointed, into DPT-Hybrid, Eq. 5-6), + both (Eq. 8). Time per step and
peak memory, as ratios to the diffusion-only step.

Usage (from the repository root): OMP_NUM_THREADS=1 python -m bench.innercontrol_sd_step [--image-size 256] [--steps 2]

Every term is switched on for the sample (its range widened to all 1000 steps), so each row is the cost of a step in
which the term applies; the VAE encode of the image is part of every step, as in the run (ref/innercontrol_sd.py).
Each variant runs in a process of its own, so that its peak memory is its own: "peak RSS" is the process's resident
memory at its highest during the steps (weights included), "step memory" that peak less the memory once every network
is built (activations, gradients, the allocator's caches). One warm-up step is not timed. The processes with the
alignment term also time the probe's forward and backward pass by itself, its share of their step. At 512 px a step takes minutes on one core:
256 px (32 x 32 latents) keeps the run to minutes; DPT sees 384 x 384 at any size.
"""
import argparse
import json
import subprocess
import sys
import threading
import time

import torch

from ref.clip import MODELS as TEXT_ENCODERS
from ref.controlnet import ControlNet
from ref.dpt import DPTHybridDepth
from ref.innercontrol import InnerControlTerms, alignment_loss, innercontrol_task, innercontrol_training_step
from ref.innercontrol_sd import SD_SIZES, StableDiffusion, build_probe
from ref.runtime import SampleDraws
from ref.schedules import DDPMSchedule
from ref.unet import UNet
from ref.vae import MODELS as AUTOENCODERS

VARIANTS = {  # reward term, alignment term
    "diffusion only": (False, False),
    "+ alignment": (False, True),
    "+ reward": (True, False),
    "+ reward + alignment": (True, True),
}
PAGE = 4096


def resident_bytes():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * PAGE


class PeakMemory:
    """The highest resident memory seen by a thread reading it every 5 ms while the block runs."""

    def __enter__(self):
        self.peak, self.running = resident_bytes(), True
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def watch(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, resident_bytes())


def measure(variant, image_size, steps):
    """One variant, in this process: -> {seconds per step, peak resident bytes, step bytes}."""
    torch.manual_seed(0)
    sizes = SD_SIZES["sd15"]
    unet = UNet(**sizes["unet"])
    base = StableDiffusion(unet, AUTOENCODERS[sizes["vae"]](), TEXT_ENCODERS[sizes["text_encoder"]](),
                           checkpoint_decode=True)
    controlnet = ControlNet.from_unet(unet)
    reward_on, alignment_on = VARIANTS[variant]
    task = innercontrol_task("depth")
    probe_config = dict(task="depth", tap_mode="auto", probe_upsample=None, probe_resolution=image_size // 8,
                        probe_width=384, num_classes=1)
    probe = build_probe(probe_config, unet).requires_grad_(False) if alignment_on else None
    reward = DPTHybridDepth() if reward_on else None
    terms = InnerControlTerms(task.alpha, reward, (0, 999), task.reward_kind, task.beta, probe, "attn", (0, 999),
                              task.alignment_kind, decode=base.decode)
    schedule = DDPMSchedule.named("scaled_linear")
    images = torch.rand(1, 3, image_size, image_size) * 2 - 1
    control = torch.rand(1, 1, image_size, image_size)
    hint, tokens = control.expand(1, 3, -1, -1), torch.randint(0, 49407, (1, 77))

    def step(seed):
        draws = SampleDraws([seed])
        latents = base.encode(images, draws)
        loss = innercontrol_training_step(controlnet, base, schedule, terms, latents, tokens, hint, control, draws,
                                          torch.device("cpu")).mean()
        controlnet.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)

    before = resident_bytes()
    with PeakMemory() as memory:
        step(0)  # warm-up, not timed
        start = time.perf_counter()
        for seed in range(1, steps + 1):
            step(seed)
        seconds = (time.perf_counter() - start) / steps
    result = dict(seconds=seconds, peak=memory.peak, step_memory=memory.peak - before)
    if alignment_on:
        result["probe_seconds"] = probe_seconds(base, probe, image_size, control, steps)
    return result


def probe_seconds(base, probe, image_size, control, steps):
    """The alignment term by itself: the probe's forward and backward pass (to the features) on SD1.5's decoder
    features of one sample, s per step: a direct figure for its share, less exposed to a busy machine than the
    difference of two step times."""
    latent = image_size // base.vae.downsampling_factor
    t = torch.tensor([500])
    with torch.no_grad():
        _, features = base.unet(torch.randn(1, 4, latent, latent), t, torch.randn(1, 77, 768), taps="attn")
        t_emb = base.unet.embed_time(t)
    features = [feature.requires_grad_() for feature in features]
    start = time.perf_counter()
    for _ in range(steps):
        alignment_loss(probe, features, t_emb, control, "mse").sum().backward()
    return (time.perf_counter() - start) / steps


def main(args):
    if args.variant:
        torch.set_num_threads(1)
        print(json.dumps(measure(args.variant, args.image_size, args.steps)))
        return
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, "-m", "bench.innercontrol_sd_step", "--variant", variant, "--image-size",
                   str(args.image_size), "--steps", str(args.steps)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
        print(f"{variant}: {results[variant]}", flush=True)
    plain = results["diffusion only"]
    print(f"\nSD1.5 ControlNet step, depth, batch 1, {args.image_size} px, one CPU thread, random weights")
    print(f"{'terms':<22} {'s/step':>7} {'time':>6} {'peak RSS':>9} {'peak':>6} {'step mem':>9} {'step mem':>9}")
    for variant, result in results.items():
        print(f"{variant:<22} {result['seconds']:>7.1f} {result['seconds'] / plain['seconds']:>5.2f}x "
              f"{result['peak'] / 2 ** 30:>7.2f}GB {result['peak'] / plain['peak']:>5.2f}x "
              f"{result['step_memory'] / 2 ** 30:>7.2f}GB {result['step_memory'] / plain['step_memory']:>8.2f}x")
    for variant, result in results.items():
        if "probe_seconds" in result:
            print(f"alignment term alone (probe forward + backward) in '{variant}': {result['probe_seconds']:.2f} s, "
                  f"{result['probe_seconds'] / result['seconds']:.1%} of that step")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--variant", choices=list(VARIANTS), help="measure this variant alone, in this process")
    main(parser.parse_args())
