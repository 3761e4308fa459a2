"""Step-time overhead of InnerControl's terms: a ControlNet training step with the diffusion loss alone, with the
alignment term (probe on the decoder features, Eq. 7), with the reward term (reward model on the one-step estimate,
Eq. 5-6), and with both (Eq. 8), each as a real train.py run of the shapes pipeline (data loading included).

Usage (from the repository root): OMP_NUM_THREADS=1 python -m bench.innercontrol_overhead [--steps 40] [--batch-size 16]

The partner runs (base UNet, reward estimator, probe, a ControlNet to start from) are trained for one step in a
temporary folder: weights do not change the cost. Each term runs on the samples whose t lies in its range alone
(ref/innercontrol.py, in_range_only), so its cost follows the range's share of the steps (Table 4's ranges here).
The first --warmup steps are not timed.
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch

import train
from shapes.runs import SHAPES_CONFIGS

VARIANTS = {  # alpha, beta of Eq. 8 (the depth task's Table 4 weights where on)
    "diffusion only": ("0", "0"),
    "+ alignment": ("0", "1.0"),
    "+ reward": ("0.5", "0"),
    "+ reward + alignment": ("0.5", "1.0"),
}


def seconds_per_step(out, warmup):
    """From metrics.jsonl (one entry per step): the mean time of the steps after the warm-up."""
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return (entries[-1]["seconds"] - entries[warmup - 1]["seconds"]) / (len(entries) - warmup)


def main(args):
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        one_step = ["--steps", "1", "--batch-size", "2", "--log-every", "1"]
        partners = {name: root / name / "latest.pt" for name in ("unet", "reward", "probe", "controlnet")}
        for name, config in (("unet", "shapes-unet"), ("reward", "shapes-estimator-reward")):
            train.main(["--config", config, *one_step, "--out", str(root / name)])
        for name, config in (("probe", "shapes-probe"), ("controlnet", "shapes-controlnet")):
            train.main(["--config", config, *one_step, "--base", str(partners["unet"]), "--out", str(root / name)])
        timings = {}
        for variant, (alpha, beta) in VARIANTS.items():
            out = root / variant.replace(" ", "").replace("+", "_")
            train.main(["--config", "shapes-innercontrol", "--steps", str(args.steps), "--batch-size",
                        str(args.batch_size), "--log-every", "1", "--alpha", alpha, "--beta", beta,
                        "--base", str(partners["unet"]), "--probe", str(partners["probe"]),
                        "--reward-model", str(partners["reward"]), "--init", str(partners["controlnet"]),
                        "--out", str(out)])
            timings[variant] = seconds_per_step(out, args.warmup)
    plain = timings["diffusion only"]
    print(f"\nControlNet step on {SHAPES_CONFIGS['shapes-innercontrol']['image_size']} px shapes, tiny UNet, batch "
          f"{args.batch_size}, one CPU thread")
    print(f"{'terms':<24} {'ms/step':>9} {'vs diffusion only':>18}")
    for variant, seconds in timings.items():
        print(f"{variant:<24} {1000 * seconds:>9.1f} {seconds / plain:>17.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    main(parser.parse_args())
