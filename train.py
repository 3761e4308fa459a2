"""Train one stage of either paper: a DiT / SiT with the Internal Guidance head (Zhou et al., arXiv 2512.24176), or a
stage of the InnerControl pipeline (arXiv 2507.02321) on the shapes data: base UNet, control estimators, readout
probe, ControlNet with Eq. 8.

    python train.py --config shapes-tiny [--steps N] [--batch-size B] [--lr LR] [--out DIR] [...]
    torchrun --nproc_per_node=N train.py --config sit-xl2-imagenet --data-path LATENT_SHARDS [...]
    python train.py --config shapes-probe --task segmentation [...]

Named configs and their fields live in ref/training.py (CONFIGS); every field is a flag (--help lists them); what a
job trains and its loss are in ref/jobs.py. DiT objectives: flow matching with the velocity target (SiT / the IG
release, t ~ U(0, 1)) or DDPM eps (DiT), each with the IG auxiliary term lambda ||D_i - target||^2. AdamW (betas 0.9,
0.999, no weight decay), gradient clipping, label / caption dropout for CFG, EMA weights; bf16 autocast and TF32 on
CUDA. Rerun the same command to resume from OUT/latest.pt: the data order and every random draw are functions of the
seed and the step, so the resumed run is bitwise the uninterrupted one. Rank 0 writes OUT/latest.pt (atomically),
OUT/log.txt and OUT/metrics.jsonl (loss, images/s, MFU); with --snapshot-every N, counted in training images (EDM's
habit), also a numbered copy OUT/snapshot-<images seen, 9 digits>.pt whenever the images seen pass a multiple of N, for
FID-vs-training curves (`sample.py OUT/snapshot-....pt`); the cadence may change on resume. Bad input (a count below 1,
a file that is not a checkpoint, ...): one `error:` line and exit status 2, nothing written.
"""
import argparse
from pathlib import Path

from ref import training


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_config_flags(parser)
    parser.add_argument("--out", help="run folder (default runs/<config>, runs/<config>-<task> for a task's stage)")
    args = parser.parse_args(argv)
    config = training.resolve_config(args)
    return config, Path(args.out) if args.out else training.default_out(config)


def main(argv=None):
    config, out = parse_args(argv)
    with training.distributed() as world:
        training.fit(config, out, world)


if __name__ == "__main__":
    main()
