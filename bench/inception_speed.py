"""Speed of the FID Inception forward: seconds per batch and images per second.

Usage (from the repository root):
    python -m bench.inception_speed [--batch 50] [--size 299] [--threads 2] [--repeats 3] [--device cpu] [--resize tf1]

Random weights (speed does not depend on them), float32, inference mode; the first batch is a warm-up and not timed.
--resize picks the input pipeline (ref/inception.py): tf1, the TF graph's (eval.py's default), or pytorch.
"""
import argparse
import time

import torch

from ref.arguments import usable_device
from ref.inception import INPUT_PIPELINES, FIDInceptionV3
from ref.runtime import exit_with_error


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--size", type=int, default=299, help="input side in pixels (resized to 299 inside)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resize", default="tf1", choices=sorted(INPUT_PIPELINES), help="input pipeline")
    args = parser.parse_args()
    try:
        device = usable_device(args.device)
    except ValueError as error:
        exit_with_error(error)
    torch.set_num_threads(args.threads)
    network = FIDInceptionV3(random_weights=True, resize=args.resize).to(device)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    seconds = []
    with torch.inference_mode():
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            network(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    per_batch = min(seconds[1:])  # the fastest timed run: the least disturbed by other work on the machine
    print(f"FID Inception forward ({args.resize} input), batch {args.batch} at {args.size}x{args.size}, "
          f"{args.threads} threads, "
          f"{device}: {per_batch:.2f} s per batch (runs: {', '.join(f'{s:.2f}' for s in seconds[1:])}), "
          f"{args.batch / per_batch:.1f} images/s")


if __name__ == "__main__":
    main()
