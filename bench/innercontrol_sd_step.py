"""Cost of InnerControl's terms at SD1.5 size: one ControlNet training step (forward, backward, gradient clipping; the
AdamW update is the same in every variant and left out) at batch 1 on the CPU with random weights, depth task:
the diffusion loss alone, + alignment (the probe on the decoder's 9 self-attention maps, Eq. 7), + reward (the one-step
x0 decoded through the VAE with gradients, checkpointed, into DPT-Hybrid, Eq. 5-6), + both (Eq. 8). Time per step and
peak memory, as ratios to the diffusion-only step.

Usage (from the repository root): OMP_NUM_THREADS=1 python -m bench.innercontrol_sd_step [--image-size 256] [--rounds 2]

Every term is switched on for the sample (its range widened to all 1000 steps), so each row is the cost of a step in
which the term applies; the VAE encode of the image is part of every step, as in the run (ref/innercontrol_sd.py).
Time: one process runs the four variants' steps in turn, a warm-up round and then --rounds timed ones (median), so a
load that drifts on a shared machine weighs on all alike; it also times the probe's forward and backward pass by
itself. Memory: each variant builds its own networks in a process of its own and runs one step: "peak RSS" is the
process's resident memory at its highest during the step (weights included), "step memory" that peak less the memory
once every network is built (activations, gradients). 512 px takes minutes a step on one core: 256 px (32 x 32
latents) keeps the run to about 15 minutes; DPT sees 384 x 384 at any size.
"""
import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import torch

from ref.clip import MODELS as TEXT_ENCODERS
from ref.controlnet import ControlNet
from ref.dpt import DPTDepth
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


class StepBench:
    """SD1.5, a ControlNet copied from its UNet, and the networks of the `variants`' terms, with `batch` samples'
    inputs, built on `device`; step(variant, seed) runs one training step of a variant. sd_size and dpt: the
    networks' sizes (ref.innercontrol_sd.SD_SIZES, ref.dpt.DPT_CONFIGS: "tiny" for the GPU check's CPU smoke);
    gradient_checkpointing: the UNet's and the ControlNet's blocks recomputed in the backward pass."""

    def __init__(self, image_size, variants, batch=1, device=torch.device("cpu"), sd_size="sd15",
                 dpt="dpt-hybrid-midas", gradient_checkpointing=False):
        torch.manual_seed(0)
        self.device, sizes = device, SD_SIZES[sd_size]
        with device:
            unet = UNet(**sizes["unet"], gradient_checkpointing=gradient_checkpointing)
            self.base = StableDiffusion(unet, AUTOENCODERS[sizes["vae"]](), TEXT_ENCODERS[sizes["text_encoder"]](),
                                        checkpoint_decode=True)
            self.controlnet = ControlNet.from_unet(unet, hint_downsampling=self.base.vae.downsampling_factor,
                                                   gradient_checkpointing=gradient_checkpointing)
        task = innercontrol_task("depth")
        probe_config = dict(task="depth", tap_mode="auto", probe_upsample=None, probe_resolution=image_size // 8,
                            probe_width=384, num_classes=1)
        uses = [VARIANTS[variant] for variant in variants]
        with device:
            self.probe = build_probe(probe_config, unet).requires_grad_(False) if any(a for _, a in uses) else None
            reward = DPTDepth(config=dpt) if any(r for r, _ in uses) else None
        self.terms = {variant: InnerControlTerms(task.alpha, reward if reward_on else None, (0, 999),
                                                 task.reward_kind, task.beta, self.probe if alignment_on else None,
                                                 "attn", (0, 999), task.alignment_kind, decode=self.base.decode)
                      for variant, (reward_on, alignment_on) in zip(variants, uses)}
        self.schedule = DDPMSchedule.named("scaled_linear")
        self.images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
        self.control = torch.rand(batch, 1, image_size, image_size)
        self.hint = self.control.expand(batch, 3, -1, -1)
        self.tokens = torch.randint(0, 49407, (batch, 77))

    def step(self, variant, seed):
        """Forward, backward and gradient clipping of one step. -> its seconds"""
        start = time.perf_counter()
        draws = SampleDraws(range(seed, seed + len(self.images)))
        latents = self.base.encode(self.images, draws)
        loss = innercontrol_training_step(self.controlnet, self.base, self.schedule, self.terms[variant], latents,
                                          self.tokens, self.hint, self.control, draws, self.device).mean()
        self.controlnet.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.controlnet.parameters(), 1.0)
        return time.perf_counter() - start

    def probe_seconds(self, repeats):
        """The alignment term by itself: the probe's forward and backward pass (to the features) on SD1.5's decoder
        features of one sample, s per step."""
        latent = self.images.shape[-1] // self.base.vae.downsampling_factor
        t = torch.tensor([500])
        with torch.no_grad():
            _, features = self.base.unet(torch.randn(1, 4, latent, latent), t, torch.randn(1, 77, 768), taps="attn")
            t_emb = self.base.unet.embed_time(t)
        features = [feature.requires_grad_() for feature in features]
        start = time.perf_counter()
        for _ in range(repeats):
            alignment_loss(self.probe, features, t_emb, self.control, "mse").sum().backward()
        return (time.perf_counter() - start) / repeats


def memory_of(variant, image_size):
    """One variant's networks alone in this process, one step: -> {peak resident bytes, step bytes}."""
    bench = StepBench(image_size, [variant])
    before = resident_bytes()
    with PeakMemory() as memory:
        bench.step(variant, 0)
    return dict(peak=memory.peak, step_memory=memory.peak - before)


def interleaved_seconds(image_size, rounds):
    """Every variant's step in turn, `rounds` times after a warm-up round, so a load that drifts on a shared machine
    weighs on all alike: -> {variant: median seconds}, and the probe's own seconds."""
    bench = StepBench(image_size, list(VARIANTS))
    for variant in VARIANTS:  # warm-up
        bench.step(variant, 0)
    times = {variant: [] for variant in VARIANTS}
    for seed in range(1, rounds + 1):
        for variant in VARIANTS:
            times[variant].append(bench.step(variant, seed))
    return {variant: statistics.median(values) for variant, values in times.items()}, bench.probe_seconds(rounds)


def child(*args):
    command = [sys.executable, "-m", "bench.innercontrol_sd_step", *map(str, args)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main(args):
    torch.set_num_threads(1)
    if args.variant:
        print(json.dumps(memory_of(args.variant, args.image_size)))
        return
    memory = {variant: child("--variant", variant, "--image-size", args.image_size) for variant in VARIANTS}
    seconds, probe = interleaved_seconds(args.image_size, args.rounds)
    plain_seconds, plain = seconds["diffusion only"], memory["diffusion only"]
    print(f"SD1.5 ControlNet step, depth, batch 1, {args.image_size} px, one CPU thread, random weights; time: median "
          f"of {args.rounds} interleaved rounds")
    print(f"{'terms':<22} {'s/step':>7} {'time':>6} {'peak RSS':>9} {'peak':>6} {'step mem':>9} {'step mem':>9}")
    for variant in VARIANTS:
        used = memory[variant]
        print(f"{variant:<22} {seconds[variant]:>7.1f} {seconds[variant] / plain_seconds:>5.2f}x "
              f"{used['peak'] / 2 ** 30:>7.2f}GB {used['peak'] / plain['peak']:>5.2f}x "
              f"{used['step_memory'] / 2 ** 30:>7.2f}GB {used['step_memory'] / plain['step_memory']:>8.2f}x")
    print(f"alignment term alone (probe forward + backward): {probe:.2f} s, {probe / seconds['+ alignment']:.1%} of "
          f"the '+ alignment' step")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of the four variants (after a warm-up)")
    parser.add_argument("--variant", choices=list(VARIANTS), help="measure this variant's memory alone, here")
    main(parser.parse_args())
