"""Sampling entry point for trained DiT/SiT checkpoints (Euler-Maruyama / Heun, CFG and IG with intervals).

Not built yet: issue 4 brings it (per-sample seeds, torchrun-parallel, PNG grid and ADM .npz). The samplers and the
guidance it will call are ready in ref/samplers.py and ref/guidance.py; the 2D toy samples with `python -m toy.run`.
"""
import sys

if __name__ == "__main__":
    print(__doc__.strip())
    sys.exit(2)
