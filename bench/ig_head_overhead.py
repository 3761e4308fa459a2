"""Parameter overhead of the Internal Guidance head (paper: SiT-XL/2 675.1M -> 677.8M, about +0.4%).

SiT-X/p is DiT-X/p without learned sigma; the head sits after the paper's block (IG_HEAD_BLOCK). Models are built on
the meta device, so nothing is allocated.

Usage (from the repository root): python -m bench.ig_head_overhead [--models DiT-B/2 DiT-XL/2]
"""
import argparse

import torch

from ref.dit import IG_HEAD_BLOCK, MODELS, count_parameters, ig_head_overhead


def main(args):
    print(f"{'model':10} {'head after':>10} {'plain':>14} {'IG head':>12} {'with head':>14} {'overhead':>9}")
    for name in args.models:
        with torch.device("meta"):
            depth = len(MODELS[name]().blocks)
            model = MODELS[name](intermediate_block=IG_HEAD_BLOCK[depth])
        head, fraction = ig_head_overhead(model)
        total = count_parameters(model)
        print(f"{name.replace('DiT', 'SiT'):10} {f'{model.intermediate_block}/{depth}':>10} {total - head:>14,} "
              f"{head:>12,} {total:>14,} {100 * fraction:>8.2f}%")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["SiT-B/2", "SiT-XL/2"])
    main(parser.parse_args())
