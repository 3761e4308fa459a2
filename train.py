"""Train one stage of either paper: a DiT / SiT or LightningDiT with the Internal Guidance head (Zhou et al., arXiv
2512.24176), or a stage of the InnerControl pipeline (arXiv 2507.02321): on the shapes data (base UNet, control
estimators, readout probe, ControlNet with Eq. 8) or on SD1.5 (readout probe, ControlNet fine-tune, ControlNet with
Eq. 8).

    python train.py --config shapes-tiny [--steps N] [--batch-size B] [--lr LR] [--out DIR] [...]
    torchrun --nproc_per_node=N train.py --config sit-xl2-imagenet --data-path LATENT_SHARDS [...]
    torchrun --nproc_per_node=N train.py --config lightningdit-xl1-imagenet --data-path LATENT_SHARDS [...]
    python train.py --config shapes-probe --task segmentation [...]
    torchrun --nproc_per_node=8 train.py --config sd15-innercontrol --task depth --sd15 FILE --tokenizer VOCAB
        --data-path FOLDER --reward-model DPT_FILE [...]

Named configs and their fields live in ref/configs.py, shapes/runs.py and ref/innercontrol_sd.py; every field is a
flag (--help lists them). The loop is ref/trainer.py; the training steps are ref/internal_guidance.py (IG) and
ref/innercontrol.py (Eq. 8), the testbed's other runs are in shapes/runs.py, the SD1.5 runs in ref/innercontrol_sd.py.
DiT objectives: flow matching with the velocity target (SiT / the IG release, t ~ U(0, 1)) or DDPM eps (DiT), each
with the IG auxiliary term lambda ||D_i - target||^2; for flow, optionally LightningDiT's cosine term (--cosine-loss)
and IG's accelerated training (--ig-omega, with the EMA network). Latent shards are prepare.py's (--vae names the VAE
that encoded them): stored moments give a fresh posterior sample every step, stored samples are normalised by
SHARDS/latents_stats.pt. AdamW (beta1 0.9, --adam-beta2, no weight decay; a constant lr, or --lr-decay-steps N: the last
N steps lower it linearly towards 0, settable on resume with more --steps), gradient clipping, gradient accumulation
(--grad-accumulation), label / caption dropout for CFG, EMA weights; bf16 autocast and TF32 on CUDA. Rerun the same
command to resume from OUT/latest.pt: the data order and every random draw are functions of the seed and the step, so
the resumed run is bitwise the uninterrupted one. Rank 0 writes OUT/latest.pt (atomically), OUT/log.txt and
OUT/metrics.jsonl (loss, images/s, MFU); with --snapshot-every N, counted in training images (EDM's habit), also a
numbered copy OUT/snapshot-<images seen, 9 digits>.pt whenever the images seen pass a multiple of N, for FID-vs-training
curves (`sample.py OUT/snapshot-....pt`); the cadence may change on resume. Every checkpoint holds the CRC-32 of each
tensor, checked when it is read: a damaged OUT/latest.pt is refused, and a rerun resumes from the newest intact snapshot
instead (said on stderr). On the CPU a small config (under 100 GFLOP a step) trains on one thread per process unless
OMP_NUM_THREADS is set. Bad input (a count below 1, a number that is not finite, a seed outside 0..2**32-1, an --out
that cannot be made, a file that is not a checkpoint, shards that do not fit the config, ...): one `error:` line and
exit status 2, nothing written.
"""
import argparse
from pathlib import Path

from ref import configs
from ref.innercontrol_sd import SD_CONFIGS, SD_RUNS
from ref.runtime import distributed, exit_with_error
from ref.trainer import fit
from shapes import runs as shapes_runs

CONFIGS = {**configs.CONFIGS, **shapes_runs.SHAPES_CONFIGS, **SD_CONFIGS}


def run_class(preset):
    """The kind of run a named config is: InnerControl at SD1.5 scale (ref/innercontrol_sd.py) or the others'."""
    return SD_RUNS.get(preset["job"]) or shapes_runs.run_class(preset)


def make_run(config, load=True):
    """The run of a config, by its `job` (what ref.trainer.fit is given)."""
    run = SD_RUNS.get(config["job"])
    return run(config, load) if run else shapes_runs.make_run(config, load)


def parse_args(argv=None):
    """-> (config, out). The flags are the chosen config's fields: `--config NAME --help` lists them."""
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--config", choices=list(CONFIGS))
    chosen, _ = chooser.parse_known_args(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, choices=list(CONFIGS),
                        help="named config (ref/configs.py, shapes/runs.py, ref/innercontrol_sd.py); with --help: "
                             "its fields as flags")
    parser.add_argument("--out", help="run folder (default runs/<config>, runs/<config>-<task> for a task's stage)")
    fields = run_class(CONFIGS[chosen.config]).fields if chosen.config else {}
    configs.add_config_flags(parser.add_argument_group(f"fields of {chosen.config}"), fields)
    args = parser.parse_args(argv)
    try:
        config = configs.resolve_config(args, CONFIGS[args.config], fields)
    except ValueError as error:
        exit_with_error(error)
    return config, Path(args.out) if args.out else configs.default_out(config)


def main(argv=None):
    config, out = parse_args(argv)
    with distributed() as world:
        fit(make_run, config, out, world)


if __name__ == "__main__":
    main()
