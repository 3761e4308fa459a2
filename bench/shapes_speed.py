"""Rendering speed of the procedural shapes data (image and all controls), samples per second on one core.

Usage (from the repository root): OMP_NUM_THREADS=1 python -m bench.shapes_speed [--sizes 32 64] [--samples 5000]
"""
import argparse
import time

import torch

from shapes.data import Shapes


def main(args):
    torch.set_num_threads(1)
    print(f"{'size':>5} {'samples/s':>10} {'ms/sample':>10}")
    for size in args.sizes:
        dataset = Shapes(size, num_items=args.samples)
        dataset[0]  # warm-up
        start = time.perf_counter()
        for index in range(args.samples):
            dataset[index]
        seconds = time.perf_counter() - start
        print(f"{size:>5} {args.samples / seconds:>10.0f} {1000 * seconds / args.samples:>10.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--samples", type=int, default=5000)
    main(parser.parse_args())
