"""Training entry point (DiT/SiT with Internal Guidance, then ControlNet with InnerControl).

Not built yet: issue 4 brings the torchrun training loop (DDP, bf16, EMA, exact resume, named configs) and issue 5 the
ControlNet / InnerControl configurations. The 2D toy trains with `python -m toy.run`.
"""
import sys

if __name__ == "__main__":
    print(__doc__.strip())
    sys.exit(2)
