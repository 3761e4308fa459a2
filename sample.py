"""Sample a trained DiT / SiT / LightningDiT with Internal Guidance and / or CFG, each on its own interval of t, and
decode a latent model's samples with its VAE; or a ControlNet run.

    python sample.py runs/shapes-tiny [--num-samples 64] [--seed 0] [--batch-size 32] [--sampler em|heun|ddpm|ddim]
                     [--steps N] [--ig W] [--ig-interval LO HI] [--cfg S] [--cfg-interval LO HI] [--out DIR]
                     [--labels balanced|random] [--png]
    python sample.py SiT-XL-2-IG.pt --checkpoint-kind ig-sit --model SiT-XL/2 --ig 1.4 --cfg 1.35 --cfg-interval 0 0.7 \
                     --labels random --vae sd-vae-ft-ema --num-samples 50000 --bf16            # then eval.py fid
    python sample.py ... --vae FILE --fid-ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-...pth  # FID now
    python sample.py LightningDiT-XL-1-IG.pt --checkpoint-kind ig-lightningdit --model LightningDiT-XL/1 \
                     --ig 1.4 --cfg 1.45 --cfg-interval 0 0.81 --labels random --vae vavae-f16d32.pt \
                     --latent-stats latents_stats.pt --num-samples 50000 --bf16               # Heun, 124 steps
    python sample.py DiT-XL-2-256x256.pt --checkpoint-kind dit --model DiT-XL/2 --cfg 1.5      # DDPM, 250 steps
    python sample.py SiT-XL-2-256x256.pt --checkpoint-kind sit --model SiT-XL/2 --cfg 1.5      # Euler-Maruyama, 250
    python sample.py runs/shapes-innercontrol-depth --num-samples 200 --seeds-per-control 2 --cfg 3 --steps 20
    torchrun --nproc_per_node=N sample.py ...

RUN is a run folder (its latest.pt) or a checkpoint of train.py; its EMA weights are used (--weights model: the raw
ones). --checkpoint-kind says what else it may be, with --model PRESET for its size (--image-size, --num-classes):
  own     a train.py run (the default): objective, head and schedule from its config.
  dit     facebookresearch/DiT: eps prediction with learned sigma (2C output channels). Its own protocol: DDPM
          ancestral sampling respaced to 250 steps (space_timesteps) with the learned variance of the extra channels,
          CFG on the first 3 latent channels with the rest (the 4th and the variance) from the conditional branch,
          as its forward_with_cfg; --sampler ddim also fits. No IG head.
  sit     willisma/SiT: velocity with learned sigma, time the other way (t = 0 noise, velocity x0 - eps), turned into
          this repository's convention (ref.dit.reversed_time); Euler-Maruyama (its sample.py SDE: 250 steps, last
          step Mean 0.04, diffusion form "sigma", which is g(t)^2 = 2t here) or Heun; CFG on 3 channels as its
          forward_with_cfg. No IG head.
  ig-sit  the IG release (CVL-UESTC/Internal-Guidance): velocity, t = 1 noise as here, the IG head `final_layer_xr`
          after block 8 or its training args' encoder_depth (a different --intermediate-block is refused); CFG on
          every channel, as its samplers.py.
  ig-lightningdit  the IG release's LightningDiT (LightningDiT/, --model LightningDiT-XL/1): VA-VAE f16d32 latents
          (32 channels, 16 x 16 at 256 px) normalised per channel (--latent-stats, its latents_stats.pt); the head
          `final_layer_xr` after its config's encoder_depth (8); time the other way, turned inside ref.lightningdit.
          Its sampler (inference.py, transport/): Heun ODE (torchdiffeq "heun2": a Heun step on every interval, the
          last included) on 125 grid points = 124 steps, 248 network evaluations (--steps 124, the default here),
          timestep shift 0.3 (ref.samplers.shifted_grid); IG 1.4 everywhere; CFG 1.45 on every channel (its
          forward_with_cfg guides all in_channels) "from t = 0.19" in its time (t = 0 noise), i.e. where
          t_release >= 0.19: --cfg-interval 0 0.81 here; without CFG it uses IG 1.7. Its reported FIDs use random
          labels (--labels random): 1.19 with CFG, 1.34 without (50K samples).
Flow models (t = 1 noise -> 0 data): Euler-Maruyama, the IG default (250 steps on the grid 1 -> 0.04, then a mean step
to 0; --diffusion sbdm: SiT's "SBDM" coefficient instead of g(t)^2 = 2t), or Heun on a uniform grid (--timestep-shift:
LightningDiT's shifted one) with an Euler last step (ig-lightningdit: a Heun step, as its release). Eps models:
DDPM ancestral (respaced to --steps as ADM / DiT do; own runs: every one of the T steps by default) or DDIM. Guidance
goes through ref.guidance.guided_denoiser; intervals are in t in [0, 1] (t = 1 noise; for eps models t = timestep /
1000); a step outside the CFG interval runs the conditional branch only, and settings.json reports the network
evaluations counted per sample.
Sample i has label i mod num_classes (--labels balanced, the default), a label drawn from numpy's generator seeded
with seed + i (--labels random, as the IG release's "random sampling" FIDs) or --class-label, and its own generator,
seeded with seed + i, for its initial noise and every step's noise: the samples do not depend on the batch size or
the number of ranks (up to float32 rounding: CPU matmul kernels round differently for different row counts, ~1e-7,
which can move a rare pixel by one level; on this machine the tests' 7 samples came out bitwise equal). Rank r takes
samples r, r + W, r + 2W, ...; rank 0 gathers them and writes OUT/samples.npz (ADM: arr_0 uint8 N x H x W x 3,
arr_1 labels), OUT/grid.png and OUT/settings.json, with --png also OUT/images/000000.png, ... (sample order).
FID while sampling: with --fid-ref REF.npz (an ADM reference batch) each decoded batch goes through the FID Inception
(--inception, the reference's input pipeline as eval.py fid picks it) as soon as it is sampled; each rank keeps the
running moments of its pool and spatial features and the pool features and logits (ref.metrics.ImageFeatures), rank 0
merges them (Chan et al.'s pairwise update) and writes OUT/fid.json with IS, FID, sFID and precision/recall: eval.py
fid's numbers on the same samples, up to float rounding, without the images stored (grid.png keeps the first ones;
--npz, --png keep them all). settings.json's fid_feature_seconds is rank 0's time in the Inception.
Latent models: with --vae PATH (ref.latents.read_vae; --vae-kind, default: an own run's config `vae`, sd for dit / sit /
ig-sit, vavae-f16d32 for ig-lightningdit) each batch is decoded on the sampling device (under bf16 autocast with
--bf16 on CUDA) into the images above: the latents divided by the VAE's scaling factor (sd: 0.18215), or for a model
of per-channel normalised latents (LightningDiT, an own run on vavae-f16d32) denormalised first with --latent-stats
(z * std + mean, ref.latents.denormalise_latents; an own run's default: <its data_path>/latents_stats.pt). Without
--vae they are written as OUT/latents.npy (N, C, h, w), the VAE's own latents ready for its decoder, and
OUT/labels.npy. A VAE file of another kind, a missing statistics file or one of another channel count is refused
before sampling.

A controlnet run of the InnerControl pipeline (train.py --config shapes-controlnet / shapes-innercontrol) samples
its base UNet steered by the ControlNet: DDIM (50 steps by default) with CFG on the caption (--cfg, the control in both
branches). Sample i follows the control and caption of evaluation scene i // --seeds-per-control (Shapes seed
shapes.evaluation.EVAL_SCENE_SEED) from noise seeded with seed + i; arr_1 holds the scene indices, grid.png shows each
control beside its samples; `eval.py innercontrol` scores them.
Bad input: a message and exit status 2, nothing written; a foreign checkpoint that does not fit is named in one line
with the kind its keys belong to.
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ref import runtime, sampling, text_to_image
from ref.arguments import check_arguments, check_seed, writable_folder
from ref.control_data import CONTROL_TASKS
from ref.dit import IG_RELEASE_HEAD_BLOCK, MODELS
from ref.inception import WEIGHTS_ENV, FIDInceptionV3, InceptionWeightsError
from ref.latents import STATS_FILE
from ref.lightningdit import MODELS as LIGHTNINGDIT_MODELS
from ref.metrics import (ImageFeatures, fid_report, load_reference, merged_summary, recorded_pipeline,
                         reference_contents)
from ref.sample_outputs import gather_in_order, write_outputs
from ref.samplers import DIFFUSIONS
from ref.runtime import checkpoint_file
from ref.sampling import ARCHITECTURES, CHECKPOINT_KINDS, DEFAULT_STEPS, SAMPLERS
from ref.tokenizer import CLIPTokenizer
from ref.vae import MODELS as VAE_MODELS
from shapes import sampling as shapes_sampling
from shapes.evaluation import EVAL_SCENE_SEED


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder (uses its latest.pt) or checkpoint file")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--labels", choices=("balanced", "random"), default="balanced",
                        help="label of sample i: i mod num_classes, or drawn from a generator seeded by seed + i (the "
                             "IG release's 'random sampling')")
    parser.add_argument("--class-label", type=int, help="one label for every sample")
    parser.add_argument("--sampler", choices=sum(SAMPLERS.values(), ()),
                        help="default: em (flow), ddpm (eps), heun (ig-lightningdit)")
    parser.add_argument("--steps", type=int, help="em 250, heun 50 (ig-lightningdit 124), ddim 50 by default; ddpm: "
                        "every step of an own run, 250 for dit (fewer: respaced as ADM / DiT)")
    parser.add_argument("--timestep-shift", type=float,
                        help="heun: LightningDiT's timestep shift of the grid (1 uniform, the default; ig-lightningdit "
                             "0.3; ref.samplers.shifted_grid)")
    parser.add_argument("--eta", type=float, default=0.0, help="ddim: 0 deterministic, 1 DDPM-like")
    parser.add_argument("--diffusion", choices=tuple(DIFFUSIONS), default="ig",
                        help="em: g(t)^2 = 2t (ig: REPA / IG release; also SiT's sample.py default) or SiT's SBDM")
    parser.add_argument("--ig", type=float, default=1.0, help="IG weight w: D_i + w (D_f - D_i); 1 = off")
    parser.add_argument("--ig-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    parser.add_argument("--cfg", type=float, default=1.0, help="CFG weight s; 1 = off")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    parser.add_argument("--bf16", action="store_true", help="CUDA: run the network under bf16 autocast")
    parser.add_argument("--grid-rows", type=int, default=8, help="rows of grid.png (the first samples)")
    parser.add_argument("--seeds-per-control", type=int, default=1,
                        help="controlnet runs: samples per evaluation scene (sample i follows scene i // this)")
    parser.add_argument("--out", help="output folder (default: samples-<settings> beside the checkpoint)")
    parser.add_argument("--png", action="store_true", help="also write each image as OUT/images/<i:06d>.png")
    latent = parser.add_argument_group("latent models: decoding to images")
    latent.add_argument("--vae", help="VAE weights (ref.latents.read_vae); without it the latents are written")
    latent.add_argument("--vae-kind", choices=list(VAE_MODELS),
                        help="its preset (default: the run's config `vae`, sd for dit / sit / ig-sit, vavae-f16d32 "
                             "for ig-lightningdit); a foreign checkpoint's latents have its channels and 1/f of "
                             "--image-size")
    latent.add_argument("--latent-stats", help=f"per-channel latent statistics ({STATS_FILE}) of a model trained on "
                        f"normalised latents (LightningDiT); an own run's default: <its data_path>/{STATS_FILE}")
    fid = parser.add_argument_group("FID while sampling (the numbers of eval.py fid, without storing the images)")
    fid.add_argument("--fid-ref", help="ADM reference batch (.npz; eval.py fid --write-ref): each decoded batch's FID "
                     "Inception features are taken as it is sampled, merged over the ranks, and IS, FID, sFID and "
                     "precision/recall written to OUT/fid.json; only grid.png's samples are kept, unless --npz / --png")
    fid.add_argument("--inception", help=f"with --fid-ref: FID Inception weights (default: ${WEIGHTS_ENV})")
    fid.add_argument("--npz", action="store_true", help="with --fid-ref: also keep and write OUT/samples.npz")
    foreign = parser.add_argument_group("foreign checkpoints (official DiT / SiT, IG-release SiT and LightningDiT)")
    foreign.add_argument("--checkpoint-kind", choices=("own", *CHECKPOINT_KINDS), default="own")
    foreign.add_argument("--model", choices=[*MODELS, *LIGHTNINGDIT_MODELS], help="size preset of a foreign checkpoint")
    foreign.add_argument("--image-size", type=int, default=256,
                         help="image side; the latents are 1/f of it (f: 8 sd, 16 vavae-f16d32)")
    foreign.add_argument("--num-classes", type=int, default=1000)
    foreign.add_argument("--intermediate-block", type=int,
                         help=f"ig-sit, ig-lightningdit: the IG head's block when the file does not say (default "
                              f"{IG_RELEASE_HEAD_BLOCK}); one that differs from the file's is refused")
    return parser.parse_args(argv)


def default_out(path, tag):
    """samples-TAG beside the checkpoint; for any file but latest.pt (a snapshot) samples-<its name>-TAG."""
    return path.parent / ("samples-" + ("" if path.name == "latest.pt" else path.stem + "-") + tag)


def flags_as(settings, args):
    """The flags of the settings' field names as that NamedTuple."""
    return settings(**{name: getattr(args, name) for name in settings._fields})


def check_sampling_values(args):
    """Counts at least 1, finite weights, intervals of t within [0, 1], seeds seed .. seed + N - 1 in numpy's range."""
    check_arguments(args, counts=("num_samples", "batch_size", "steps", "grid_rows", "seeds_per_control",
                                  "image_size", "num_classes"),
                    finite=("ig", "cfg", "eta", "timestep_shift"), intervals=("ig_interval", "cfg_interval"))
    check_seed("seed", args.seed, args.num_samples)


def check_kind_flags(args):
    own = args.checkpoint_kind == "own"
    if own and (args.model or args.intermediate_block is not None):
        raise ValueError(f"--model and --intermediate-block describe a foreign checkpoint (--checkpoint-kind "
                         f"{', '.join(CHECKPOINT_KINDS)}); a train.py run brings its own")
    if not own and args.model is None:
        raise ValueError(f"--checkpoint-kind {args.checkpoint_kind} needs --model, the checkpoint's size preset")
    if not own:
        presets = ARCHITECTURES[CHECKPOINT_KINDS[args.checkpoint_kind]["arch"]][1]
        if args.model not in presets:
            raise ValueError(f"--model {args.model} is no preset of a {args.checkpoint_kind} checkpoint; it takes one "
                             f"of {', '.join(presets)}")
    if args.class_label is not None and args.labels == "random":
        raise ValueError("--class-label gives every sample one label; --labels random draws them")


def read_fid_inputs(args, spec, decoding):
    """--fid-ref's Inception, checked before sampling: -> (FIDInceptionV3 with the reference's input pipeline, that
    pipeline), or None without --fid-ref. Raises ValueError / InceptionWeightsError."""
    if args.fid_ref is None:
        if args.inception or args.npz:
            raise ValueError("--inception and --npz go with --fid-ref REF.npz (FID while sampling)")
        return None
    if spec["latent"] and decoding[0] is None:
        raise ValueError("--fid-ref scores images: this latent model needs --vae PATH to decode its samples")
    resize = recorded_pipeline(args.fid_ref, "--fid-ref")[0] or "tf1"  # eval.py fid's default
    reference_contents(args.fid_ref)
    return FIDInceptionV3(args.inception, resize=resize), resize


def write_fid(out, reference_path, fid, features, world, batch_size):
    """Every rank's features merged on rank 0 and scored against the reference batch (its features taken on this
    device) into OUT/fid.json, laid out as eval.py fid's --out. -> the metrics on rank 0, None elsewhere"""
    shares = runtime.gather_to_main(features.share())
    if shares is None:
        return None
    extractor, resize = fid
    reference = load_reference(reference_path, extractor, batch_size, world.device)
    report = {"resize": resize, **fid_report(merged_summary(shares), reference)}
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"command": "sample.py --fid-ref", "reference": reference_path, "metrics": report}, indent=2)
    runtime.atomic_write(out / "fid.json", lambda file: file.write(text.encode()))
    return report


# ---------------------------------------------------------------------------------------------------------------------
# ControlNet runs (the InnerControl pipeline): controls and captions of held-out shapes scenes
# ---------------------------------------------------------------------------------------------------------------------

def controlnet_out(args, path):
    """The output folder of a controlnet run's samples (--out, or default_out with the settings' tag), created."""
    tag = (f"ddim{args.steps or DEFAULT_STEPS['ddim']}-eta{args.eta:g}-cfg{args.cfg:g}-seed{args.seed}-"
           f"n{args.num_samples}x{args.seeds_per_control}")
    return writable_folder(args.out or default_out(path, tag))


def sample_controlnet(args, path, out, base, controlnet, config):
    """A controlnet run of the InnerControl pipeline (shapes.sampling), sampled and written into `out`."""
    steps = args.steps or DEFAULT_STEPS["ddim"]
    with runtime.distributed() as world:
        base.to(world.device), controlnet.to(world.device)
        start = time.perf_counter()
        samples = gather_in_order(shapes_sampling.controlnet_share(
            base, controlnet, config, world, args.num_samples, steps, args.cfg, args.seeds_per_control, args.seed,
            args.batch_size, args.bf16, args.eta))
        if not world.is_main:
            return
        scene_indices = np.arange(args.num_samples) // args.seeds_per_control
        settings = dict(vars(args), job="controlnet", task=config["task"], scene_seed=EVAL_SCENE_SEED, latent=False,
                        sampler="ddim", steps=steps, checkpoint=str(path), config=config,
                        network_evaluations_per_sample=steps * (2 if args.cfg != 1.0 else 1),
                        seconds=time.perf_counter() - start, world_size=world.world_size, device=str(world.device))
        write_outputs(out, samples, scene_indices, settings, 1 + args.seeds_per_control, args.grid_rows,
                      shapes_sampling.control_pictures(samples, scene_indices, config, args.seeds_per_control))
        print(f"wrote {args.num_samples} samples to {out} ({settings['seconds']:.1f} s, "
              f"{settings['network_evaluations_per_sample']} network evaluations each)")


# ---------------------------------------------------------------------------------------------------------------------
# sd15: Stable Diffusion 1.5 + ControlNet from the released weights (ref.text_to_image)
# ---------------------------------------------------------------------------------------------------------------------

SD15_HELP = """Text-to-image with Stable Diffusion 1.5 steered by a ControlNet 1.0 / 1.1, from local weight files.

    python sample.py sd15 --sd15 v1-5-pruned-emaonly.safetensors --controlnet control_v11f1p_sd15_depth.pth \\
        --tokenizer bpe_simple_vocab_16e6.txt.gz --prompts prompts.txt --controls depth/ [--out DIR] [--steps 50]
        [--sampler ddim|unipc] [--cfg 7.5] [--negative-prompt TEXT] [--control-scale 1.0] [--seeds-per-prompt 1]
        [--seed 0] [--batch-size 4] [--size 512] [--dtype fp32|bf16|fp16] [--png] [--controlnet-plus-plus]
        [--variant fp16] [--clip-skip N]
    torchrun --nproc_per_node=N sample.py sd15 ...

Weights: --sd15 an SD1.5 single file or a diffusers pipeline folder (unet/, vae/, text_encoder/), --controlnet a
ControlNet 1.0 / 1.1 file or a diffusers ControlNet folder. A folder's networks are built from its config.json (other
heads, widths, levels of the SD1.x family; SD2, SDXL and upcast_attention refused by name), its weights read as one
file or as shards (*.index.json), --variant choosing among *.<variant>.safetensors / .bin. Single files use the SD1.5
presets. --tokenizer: bpe_simple_vocab_16e6.txt.gz or a tokenizer/ folder (vocab.json + merges.txt, or tokenizer.json).
--clip-skip N: the prompt's context from layer depth - N (diffusers' clip_skip; the empty prompt's stays the last
layer's, as in diffusers).

Pairs: --prompts PROMPTS.txt holds one prompt per line, matched in order to the control images of --controls DIR
sorted by file name (.png, .jpg, .jpeg, .bmp, .webp); the counts must be equal. Or --prompts PAIRS.jsonl, one
{"prompt": ..., "control": PATH} a line, PATH relative to --controls DIR when given, else to the .jsonl's folder.
Or --data-path FOLDER --task TASK: the lines of a training-style metadata.jsonl folder (ref/control_data.py), each
caption with the hint the ControlNet reads (a map control on three channels; a segmentation line's "hint"), cut as
training cuts them (short side to --size, central square); `eval.py innercontrol-sd` scores such samples.
A control is an RGB image the size of the output (--size; 8x the latent side), fed to the ControlNet in [0, 1]; an
image of another size is resized to SIZE x SIZE (Lanczos, aspect not kept) with a warning: give segmentation maps at
the right size, or their colours blend at the borders. Prompts longer than 77 tokens are cut with a warning.
Sampling (ref.text_to_image): --sampler ddim (the default; 50 steps): DDIM, eta 0, SD's leading timesteps
(steps_offset 1; 50 steps: 981, 961, .., 1), the last step to abar_0, as diffusers' DDIMScheduler on SD1.5's scheduler
config; --sampler unipc (20 steps by default): multistep UniPC, order 2, B(h) = e^h - 1, x0 prediction, linspace
timesteps (20 steps: 999, 949, .., 50), the last step to the x0 estimate, as UniPCMultistepScheduler.from_config on that
config. CFG on the text against the empty prompt (--negative-prompt: that text instead) with the control in both
branches (--cfg 1: the text branch alone), the ControlNet's residuals times --control-scale; VAE decode of latents /
0.18215. --controlnet-plus-plus: the evaluation of the ControlNet++ and InnerControl releases (below).
Sample i follows pair i // seeds-per-prompt and its own noise generator seeded with seed + i: the same images at any
batch size or number of ranks (up to float rounding). Rank r takes samples r, r + W, ..; rank 0 writes OUT/samples.npz
(ADM: arr_0 uint8 N x S x S x 3, arr_1 the pair of each sample), OUT/grid.png (each control beside its samples),
OUT/settings.json (with every prompt and control) and, with --png, OUT/images/<pair>_<k>.png (k: the seed within
the pair). Bad input: one error line, exit status 2, nothing written.
"""
SD15_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SD15_STEPS = {"ddim": 50, "unipc": 20}  # --steps by --sampler
SD15_DEFAULTS = dict(sampler="ddim", seed=0, seeds_per_prompt=1, cfg=7.5, size=512, negative_prompt="")
CONTROLNET_PLUS_PLUS = dict(sampler="unipc", seed=42, seeds_per_prompt=4, cfg=7.5, size=512,
                            negative_prompt="worst quality, low quality")
CONTROLNET_PLUS_PLUS_CHOICES = ("sampler", "seed")  # flags of the releases' eval.py: the preset's value is a default
CONTROLNET_PLUS_PLUS_HELP = """
--controlnet-plus-plus: `eval/eval.py` of the ControlNet++ release (liming-ai/ControlNet_Plus_Plus, "C++" below) and
of the InnerControl release (ControlGenAI/InnerControl, "IC"), the same script but for IC's readout:
  sampler unipc, 20 steps: UniPCMultistepScheduler.from_config(pipe.scheduler.config) on SD1.5's pipeline (C++
      eval.py:149, IC eval.py:151), --num_inference_steps 20 (C++ :324, IC :299; both eval_*.sh NUM_STEPS=20).
      --sampler ddim takes 50 steps instead (their --ddim flag, C++ :146-147 / :323, IC :148-149 / :298; 50 DDIM
      steps as ControlNet++ reports them).
  CFG 7.5: --guidance_scale (C++ :312, IC :287; eval_*.sh SCALE=7.5; the InnerControl paper, Sec. 5.1).
  negative prompt "worst quality, low quality" (C++ :222, IC :214): its text embedding is CFG's unconditional branch.
  4 images a prompt: --batch_size 4 copies of the prompt and control in one pipeline call (C++ :204, :317; IC :189,
      :292), saved as group_0 .. group_3 (C++ :141-144); the InnerControl paper (Sec. 5.1): "4 independent sample
      batches with different random seeds", the metrics their mean.
  512 px: --resolution 512 (C++ :318, IC :293).
  seed 42 (C++ :320, IC :295): there one global seed_torch(42) per process (C++ :61, IC :60), and every pipeline call
      draws its (4, 4, 64, 64) noise from that process's CUDA generator, in the order of the process's share of the
      prompts (accelerate's split_between_processes, C++ :159, IC :160); the noise of an image thus depends on the
      number of GPUs, on its prompt's place in the share and on skipped (already written) prompts. Here sample
      i = 4 p + k (prompt p, image k) has its own generator seeded with 42 + i: the same images on any number of GPUs,
      not the releases' noise (which no per-sample scheme reproduces).
  Not fixed here: their networks run in fp16 (C++ :84-90, IC :84-90; --dtype fp16 here), their UniPC state in the
  latents' fp16 (this one float64); their diffusers version is not pinned (ref.samplers.unipc says what an older one
  changes)."""


def parse_sd15_args(argv):
    parser = argparse.ArgumentParser(prog="sample.py sd15", description=SD15_HELP + CONTROLNET_PLUS_PLUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15", required=True, help="SD1.5 single file (v1-5-pruned-emaonly.safetensors / .ckpt) "
                        "or diffusers pipeline folder (unet/, vae/, text_encoder/)")
    parser.add_argument("--controlnet", required=True, help="ControlNet 1.0 / 1.1 file (control_v11f1p_sd15_depth.pth, "
                        "...) or a diffusers ControlNet folder")
    parser.add_argument("--tokenizer", required=True, help="CLIP's bpe_simple_vocab_16e6.txt.gz, or a folder holding "
                        "vocab.json and merges.txt or tokenizer.json (a diffusers pipeline's tokenizer/)")
    parser.add_argument("--variant", help="the weights variant of diffusers folders (fp16: *.fp16.safetensors)")
    parser.add_argument("--clip-skip", type=int, default=0, help="the prompts' context from the text encoder's layer "
                        "N before the last, final LayerNorm applied (diffusers' clip_skip; A1111's 'Clip skip' N+1)")
    pairs = parser.add_mutually_exclusive_group(required=True)
    pairs.add_argument("--prompts", help="PROMPTS.txt (one a line) or PAIRS.jsonl (see above)")
    pairs.add_argument("--data-path", help="a metadata.jsonl folder (ref/control_data.py): captions and hints")
    parser.add_argument("--task", choices=CONTROL_TASKS, help="with --data-path: the control task of its lines")
    parser.add_argument("--controls", help="folder of control images (required with a .txt of prompts)")
    parser.add_argument("--out", help="output folder (default: samples-sd15-<controlnet>-<settings> here)")
    parser.add_argument("--sampler", choices=text_to_image.SAMPLERS,
                        help=f"default {SD15_DEFAULTS['sampler']} ({CONTROLNET_PLUS_PLUS['sampler']} with "
                             f"--controlnet-plus-plus)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: " + ", ".join(
        f"{sampler} {steps}" for sampler, steps in SD15_STEPS.items()) + ")")
    parser.add_argument("--cfg", type=float, help=f"CFG weight; 1 = off (default {SD15_DEFAULTS['cfg']})")
    parser.add_argument("--negative-prompt", help="CFG's unconditional text (default: the empty prompt; "
                        f"{CONTROLNET_PLUS_PLUS['negative_prompt']!r} with --controlnet-plus-plus)")
    parser.add_argument("--control-scale", type=float, default=1.0, help="multiplies the ControlNet's residuals")
    parser.add_argument("--seeds-per-prompt", type=int, help="samples a pair (default 1)")
    parser.add_argument("--seed", type=int, help="sample i uses seed + i (default 0; 42 with --controlnet-plus-plus)")
    parser.add_argument("--batch-size", type=int, default=4, help="per rank (CFG runs twice as many rows)")
    parser.add_argument("--size", type=int, help=f"image side in pixels (default {SD15_DEFAULTS['size']})")
    parser.add_argument("--dtype", choices=tuple(SD15_DTYPES), default="fp32", help="the networks' dtype")
    parser.add_argument("--png", action="store_true", help="also write one PNG per sample to OUT/images/")
    parser.add_argument("--grid-rows", type=int, default=8, help="pairs shown in grid.png")
    parser.add_argument("--controlnet-plus-plus", action="store_true",
                        help="the ControlNet++ / InnerControl releases' evaluation: UniPC 20 steps, CFG 7.5, negative "
                             "prompt, 4 seeds a prompt from seed 42, 512 px (see above)")
    parser.add_argument("--architecture", choices=tuple(text_to_image.ARCHITECTURES), default="sd15",
                        help="tiny: the test-sized networks of ref.text_to_image")
    return parser.parse_args(argv)


def resolve_sd15_settings(args):
    """Fill the unset --sampler / --seed / --seeds-per-prompt / --cfg / --size / --negative-prompt from the protocol or
    the defaults, then --steps from the sampler; a value that contradicts --controlnet-plus-plus raises (its sampler
    and seed are defaults, as in the releases' eval.py)."""
    preset = CONTROLNET_PLUS_PLUS if args.controlnet_plus_plus else SD15_DEFAULTS
    for name, value in preset.items():
        given = getattr(args, name)
        if args.controlnet_plus_plus and given not in (None, value) and name not in CONTROLNET_PLUS_PLUS_CHOICES:
            raise ValueError(f"--controlnet-plus-plus fixes --{name.replace('_', '-')} {value!r}, got {given!r}")
        setattr(args, name, value if given is None else given)
    steps = SD15_STEPS[args.sampler]
    if args.controlnet_plus_plus and args.steps not in (None, steps):
        raise ValueError(f"--controlnet-plus-plus fixes --steps {steps} for --sampler {args.sampler}, got {args.steps}")
    args.steps = steps if args.steps is None else args.steps
    check_arguments(args, counts=("steps", "seeds_per_prompt", "batch_size", "grid_rows"),
                    finite=("cfg", "control_scale"))


def read_sd15_pairs(args):
    """The pairs of --prompts (and --controls) or of --data-path. -> ([(prompt, control path)], hint(p))"""
    if args.data_path is None:
        pairs = text_to_image.read_pairs(args.prompts, args.controls)
        return pairs, text_to_image.file_hints(pairs, args.size)
    if args.task is None or args.controls:
        raise ValueError("--data-path FOLDER takes --task TASK (the control task of its lines) and no --controls")
    return text_to_image.metadata_pairs(args.data_path, args.task, args.size)


def load_sd15_inputs(args):
    """Everything sd15 reads, checked before anything is written. -> (pairs, hints, tokenizer, networks)"""
    resolve_sd15_settings(args)
    missing = [f"--{flag} {path}" for flag, path in (("sd15", args.sd15), ("controlnet", args.controlnet),
                                                     ("tokenizer", args.tokenizer)) if not Path(path).exists()]
    if missing:
        raise ValueError(f"no such file: {', '.join(missing)}")
    pairs, hints = read_sd15_pairs(args)
    check_seed("seed", args.seed, len(pairs) * args.seeds_per_prompt)
    tokenizer = CLIPTokenizer.from_path(args.tokenizer)
    networks = text_to_image.load_networks(args.architecture, args.sd15, args.controlnet, SD15_DTYPES[args.dtype],
                                           args.variant)
    text_to_image.check_tokenizer(tokenizer, networks.text_encoder)
    networks.text_encoder.check_clip_skip(args.clip_skip)
    text_to_image.latent_side(networks, args.size)
    text_to_image.sampling_timesteps(args.steps, args.sampler)
    for pair, (_, path) in enumerate(pairs):  # every control read once: a bad file stops here, not mid-sampling
        if args.data_path is None:
            text_to_image.read_control(path, args.size, warn=True)
        else:
            hints(pair)
    return pairs, hints, tokenizer, networks


def sd15_out(args, num_samples):
    """The sd15 output folder (--out, or samples-sd15-<controlnet>-<settings> here), created."""
    tag = f"{args.sampler}{args.steps}-cfg{args.cfg:g}-cs{args.control_scale:g}-seed{args.seed}-n{num_samples}"
    return writable_folder(args.out or f"samples-sd15-{Path(args.controlnet).stem}-{tag}")


def sample_sd15(argv):
    args = parse_sd15_args(argv)
    try:  # bad input stops here, before anything is written
        pairs, hints, tokenizer, networks = load_sd15_inputs(args)
        with warnings.catch_warnings(record=True) as truncated:  # prompts over 77 tokens, each named
            warnings.simplefilter("always")
            tokens = tokenizer([prompt for prompt, _ in pairs])  # (P, 77)
        for warning in truncated:
            print(f"warning: {warning.message}", file=sys.stderr)
        out = sd15_out(args, len(pairs) * args.seeds_per_prompt)
    except ValueError as error:
        runtime.exit_with_error(error)
    with runtime.distributed() as world:
        for network in networks:
            network.to(world.device)
        start = time.perf_counter()
        share = text_to_image.sd15_share(flags_as(text_to_image.PairSampling, args), networks, hints, tokens,
                                         tokenizer([args.negative_prompt]), world)
        samples = gather_in_order(share)
        if not world.is_main:
            return
        num_samples = len(samples)
        settings = dict(vars(args), job="sd15-controlnet", latent=False,
                        **text_to_image.SAMPLER_SETTINGS[args.sampler],
                        timesteps=text_to_image.sampling_timesteps(args.steps, args.sampler).tolist(),
                        num_samples=num_samples,
                        network_evaluations_per_sample=args.steps * (2 if args.cfg != 1.0 else 1),
                        pairs=[dict(prompt=prompt, control=str(path)) for prompt, path in pairs],
                        seconds=time.perf_counter() - start, world_size=world.world_size, device=str(world.device))
        pictures = text_to_image.sd15_grid_pictures(samples, hints, len(pairs), args.grid_rows, args.seeds_per_prompt)
        write_outputs(out, samples, np.arange(num_samples) // args.seeds_per_prompt, settings,
                      1 + args.seeds_per_prompt, args.grid_rows, pictures,
                      png_name=lambda index: "{:05d}_{}.png".format(*divmod(index, args.seeds_per_prompt)))
        print(f"wrote {num_samples} samples to {out} ({settings['seconds']:.1f} s)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sd15"]:
        return sample_sd15(argv[1:])
    args = parse_args(argv)
    try:  # bad input stops here, before anything is written
        check_sampling_values(args)
        check_kind_flags(args)
        path = checkpoint_file(args.run)
        checkpoint = runtime.read_run_checkpoint(path) if args.checkpoint_kind == "own" else None
        controlled = checkpoint is not None and checkpoint["args"]["job"] == "controlnet"
        if controlled:
            if (args.sampler or "ddim") != "ddim" or args.ig != 1.0:
                raise ValueError("a controlnet run samples with DDIM (--sampler ddim) and caption CFG (--cfg); it has "
                                 "no IG")
            if args.fid_ref:
                raise ValueError("--fid-ref scores class-conditional samples; eval.py innercontrol scores a "
                                 "controlnet run's")
            networks = shapes_sampling.load_controlnet(path, args.weights, checkpoint)
            out = controlnet_out(args, path)
        else:
            foreign = sampling.ForeignModel(args.run, args.model, args.image_size, args.num_classes,
                                            args.intermediate_block)
            model, spec = sampling.load_model(path, checkpoint, args.checkpoint_kind, args.weights, args.vae_kind,
                                              foreign)
            integrate, network, interval_scale, sampler, steps = sampling.make_sampler(
                model, spec, args.sampler, args.steps, args.timestep_shift, args.eta, args.diffusion)
            sampling.check_guidance(model, args.ig, args.cfg, args.class_label)
            decoding = sampling.read_decoding(model, spec, args.vae, args.vae_kind, args.latent_stats)
            fid = read_fid_inputs(args, spec, decoding)
            tag = f"{sampler}{steps}-ig{args.ig:g}-cfg{args.cfg:g}-seed{args.seed}-n{args.num_samples}"
            out = writable_folder(args.out or default_out(path, tag))
    except (ValueError, InceptionWeightsError) as error:
        runtime.exit_with_error(error)
    if controlled:
        return sample_controlnet(args, path, out, *networks)
    columns = model.num_classes if model.num_classes <= 16 else 8
    with runtime.distributed() as world:
        model.to(world.device).eval()
        if decoding[0] is not None:  # the VAE
            decoding[0].to(world.device)
        features = ImageFeatures(fid[0].to(world.device), world.device) if fid else None  # the FID's inputs
        keep_below = None if fid is None or args.npz or args.png else columns * args.grid_rows
        start = time.perf_counter()
        share, evaluations = sampling.sample_share(model, spec, (integrate, network, interval_scale), world,
                                                   flags_as(sampling.SampleSettings, args), decoding,
                                                   features.update if fid else None, keep_below)
        samples = gather_in_order(share)
        seconds = time.perf_counter() - start
        metrics = write_fid(out, args.fid_ref, fid, features, world, args.batch_size) if fid else None
        if not world.is_main:
            return
        settings = dict(vars(args), **spec, sampler=sampler, steps=steps,
                        network_evaluations_per_sample=int(evaluations) if evaluations.is_integer() else evaluations,
                        seconds=seconds, fid_feature_seconds=features.seconds if fid else None,
                        world_size=world.world_size, device=str(world.device))
        labels = sampling.sample_labels(np.arange(len(samples)), model.num_classes, args.seed, args.labels,
                                        args.class_label)
        write_outputs(out, samples, labels, settings, columns, args.grid_rows, npz=keep_below is None)
        print(f"wrote {args.num_samples} samples to {out} ({settings['seconds']:.1f} s, "
              f"{settings['network_evaluations_per_sample']} network evaluations each)")
        if metrics:
            print(f"wrote {out / 'fid.json'}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()
                                                           if isinstance(value, float))
                  + f"; the Inception took {features.seconds:.1f} s of the {seconds:.1f} s on rank 0")


if __name__ == "__main__":
    main()
