"""Prepare training data: encode an ImageNet-style image folder into VAE latent shards.

    python prepare.py latents --data-path IMAGENET_TRAIN --vae VAE_FILE --vae-kind sd|vavae-f16d32 --image-size 256
                              --out SHARDS [--flip | --no-flip] [--store moments|sample] [--batch-size B]
                              [--shard-size N] [--seed S] [--workers W]
    torchrun --nproc_per_node=N prepare.py latents ...

Images are center-cropped as ADM / DiT do (ref.data.center_crop) and encoded by the VAE (ref/vae.py; a file in any
layout ref.vae.load_state reads, or a diffusers folder). What is stored (ref/latents.py): for the SiT / IG recipe (sd)
the posterior moments, from which training draws a fresh latent every step; for LightningDiT (vavae-f16d32) one
posterior sample per item plus SHARDS/latents_stats.pt, the per-channel mean and std its latent normalisation divides
by. Mirrored images: as the releases, off for sd (the IG release's SiT never flips), on for vavae-f16d32 (LightningDiT
stores both).

SHARDS/latents_KKKKK.npy (N_k, C, h, w) float32 and labels_KKKKK.npy (N_k,) int64, latents_flip_KKKKK.npy and
labels_flip_KKKKK.npy with --flip: ref.data.LatentShards reads them (latent_shape (C, h, w), scale_factor 1); with
N images stored, item N + i is the mirror of item i. SHARDS/prepare.json records the settings and counts,
SHARDS/skipped.txt the images that could not be decoded (path, tab, reason; each also reported on stderr): they are
skipped, not stored.

Shard k holds files [k * shard_size, (k + 1) * shard_size) of the sorted listing; rank r encodes shards r, r + W, ...,
and every shard's content depends on its files alone, so the result is the same for any number of ranks. Work goes to
SHARDS.partial/, each file written atomically, then the CRC-32 digests of the shard's files; a rerun of the same
command keeps the finished shards whose files still match their digests (a damaged one is said and encoded again) and
continues; at the end SHARDS.partial/ is renamed to SHARDS, so SHARDS exists only complete, and prepare.json records
every file's digest, which training verifies when it opens the shards. Rank 0 prints progress with an ETA.
Bad input (a VAE file of another kind, an empty folder, a file that is not an image, other settings than a partial
run's): one error line and exit status 2, nothing written.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed
from torch.utils.data import DataLoader

from ref import latents, runtime
from ref.arguments import check_arguments, writable_folder
from ref.data import ImageFolder
from ref.vae import MODELS

PROGRESS_INTERVAL = 30.0  # seconds between progress lines within a shard


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("latents", help="encode an image folder into latent shards")
    command.add_argument("--data-path", required=True, help="image folder <class>/<image> (e.g. ImageNet's train)")
    command.add_argument("--vae", required=True, help="VAE weights: .safetensors, or .pt / .ckpt / .bin")
    command.add_argument("--vae-kind", required=True, choices=list(MODELS), help="the ref/vae.py preset of --vae")
    command.add_argument("--image-size", type=int, default=256, help="side of the center crop in pixels")
    command.add_argument("--out", required=True, help="folder of the shards (must not hold anything else)")
    command.add_argument("--store", choices=latents.STORES,
                         help="moments (training samples each step) or sample (one posterior sample per item); "
                              "default: moments for sd, sample for vavae-f16d32")
    command.add_argument("--flip", action=argparse.BooleanOptionalAction,
                         help="also encode each image mirrored; default: off for sd, on for vavae-f16d32")
    command.add_argument("--batch-size", type=int, default=64, help="images per VAE call on each rank")
    command.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    command.add_argument("--seed", type=int, default=0, help="store sample: item i's noise is seeded by (seed, i)")
    command.add_argument("--workers", type=int, default=4, help="image-decoding worker processes per rank")
    command.add_argument("--stop-after-shards", type=int, help=argparse.SUPPRESS)  # tests: stop as if killed
    args = parser.parse_args(argv)
    recipe = latents.RECIPES[args.vae_kind]
    args.store = args.store or recipe["store"]
    args.flip = recipe["flip"] if args.flip is None else args.flip
    args.out = Path(args.out)
    args.staging = args.out.with_name(args.out.name + ".partial")
    return args


class Plan(NamedTuple):
    images: ImageFolder
    vae: torch.nn.Module
    settings: dict
    num_shards: int


def differences(stored, settings):
    """The settings that differ, each value's text cut at 60 characters (the class list is long)."""
    return "; ".join(f"{name}: {stored.get(name)!r:.60} there, {value!r:.60} here" for name, value in settings.items()
                     if stored.get(name) != value)


def read_settings(path):
    """The settings stored in a prepare.json / settings.json, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def make_plan(args):
    """Check every input and the folders; read the listing and the VAE. Nothing is written. -> Plan, or None when
    args.out already holds this preparation. Bad input raises ValueError."""
    check_arguments(args, counts=("image_size", "batch_size", "shard_size", "stop_after_shards"),
                    non_negative=("workers",), seeds=("seed",))
    images = ImageFolder(args.data_path, args.image_size)
    vae = latents.read_vae(args.vae, args.vae_kind)
    if args.image_size % vae.downsampling_factor:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of the {args.vae_kind} VAE's "
                         f"downsampling factor {vae.downsampling_factor}")
    side = args.image_size // vae.downsampling_factor
    channels = vae.z_channels * (2 if args.store == "moments" else 1)
    settings = dict(vae_kind=args.vae_kind, store=args.store, flip=args.flip, image_size=args.image_size,
                    shard_size=args.shard_size, seed=args.seed, latent_shape=[channels, side, side],
                    scale_factor=vae.scaling_factor, files=len(images.files), classes=images.classes,
                    listing_sha256=latents.listing_digest(images, Path(args.data_path)),
                    vae_sha256=runtime.weights_digest(vae.state_dict()))
    finished = read_settings(args.out / "prepare.json")
    if finished is not None:
        if differences(finished, settings):
            raise ValueError(f"{args.out} holds latents prepared otherwise ({differences(finished, settings)}); "
                             f"choose another --out")
        return None
    if args.out.exists() and not (args.out.is_dir() and not any(args.out.iterdir())):
        raise ValueError(f"{args.out} exists and is not a finished preparation; choose another --out")
    started = read_settings(args.staging / "settings.json")
    if started is not None and differences(started, settings):
        raise ValueError(f"{args.staging} is a preparation with other settings ({differences(started, settings)}); "
                         f"rerun it with its settings or delete {args.staging}")
    writable_folder(args.staging)  # where the shards go: made, and written to, before any image is encoded
    return Plan(images, vae, settings, math.ceil(len(images.files) / args.shard_size))


def write_json(path, value):
    runtime.atomic_write(path, lambda file: file.write((json.dumps(value, indent=1) + "\n").encode()))


def write_array(path, array):
    runtime.atomic_write(path, lambda file: np.save(file, array))


def digests_file(folder, shard):
    """The shard's {file name: CRC-32 of its bytes}, written after its arrays: it marks the shard done."""
    return folder / f"digests_{shard:05d}.json"


def shard_done(folder, shard):
    return digests_file(folder, shard).is_file()


def shard_intact(folder, shard):
    """Done, and every file of the shard holds the bytes its digest was taken of; a damaged shard is said on stderr
    (the rerun encodes it again)."""
    if not shard_done(folder, shard):
        return False
    try:
        damaged = runtime.damaged_files(folder, json.loads(digests_file(folder, shard).read_text()))
    except ValueError:
        damaged = [digests_file(folder, shard).name]
    if damaged:
        print(f"warning: shard {shard} in {folder} is damaged ({damaged[0]} differs from its digest); encoding it "
              f"again", file=sys.stderr, flush=True)
    return not damaged


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class Progress:
    """Rank 0's progress through its share of this run: images, images/s, elapsed time and ETA."""

    def __init__(self, total, is_main):
        self.total, self.is_main, self.done = total, is_main, 0
        self.start = self.last = time.perf_counter()

    def advance(self, count, shard=None):
        self.done += count
        now = time.perf_counter()
        if self.is_main and (shard is not None or now - self.last >= PROGRESS_INTERVAL):
            self.last, elapsed = now, now - self.start
            rate = self.done / elapsed if elapsed > 0 else float("inf")
            print(f"{'shard ' + str(shard) + ' written; ' if shard is not None else ''}rank 0: {self.done}/"
                  f"{self.total} images, {rate:.1f} img/s, elapsed {runtime.format_seconds(elapsed)}, ETA "
                  f"{runtime.format_seconds((self.total - self.done) / rate if rate else 0)}", flush=True)


def encode_shard(args, plan, shard, device, progress):
    """Encode shard `shard` into args.staging: the skipped files' list (when any), then each array atomically, then
    the digests of their bytes (digests_file), which mark the shard done."""
    images, flip = plan.images, args.flip
    start, stop = shard * args.shard_size, min((shard + 1) * args.shard_size, len(images.files))
    loader = DataLoader(latents.ShardImages(images, start, stop), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=latents.collate_items, pin_memory=device.type == "cuda")
    stored, mirrored, labels, skipped = [], [], [], []
    for indices, batch, batch_labels, problems in loader:
        for index, problem in problems:
            print(f"warning: skipped {problem}", file=sys.stderr, flush=True)
            skipped.append(f"{images.files[index]}\t{problem}\n")
        if indices:
            batch = batch.to(device)
            stored.append(latents.encode_items(plan.vae, batch, indices, args.store, args.seed))
            if flip:  # item N + i: file i mirrored left-right, as ImageFolder(flip=True)
                mirrored.append(latents.encode_items(plan.vae, batch.flip(-1), [len(images.files) + i for i in indices],
                                                     args.store, args.seed))
            labels.append(batch_labels)
        progress.advance(len(indices) + len(problems))
    empty = torch.zeros((0, *plan.settings["latent_shape"]))
    arrays = {"labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
              "latents": torch.cat(stored) if stored else empty}
    if flip:
        arrays.update(labels_flip=arrays["labels"], latents_flip=torch.cat(mirrored) if mirrored else empty)
    skipped_file = args.staging / f"skipped_{shard:05d}.txt"
    if skipped:
        runtime.atomic_write(skipped_file, lambda file: file.write("".join(skipped).encode()))
    else:  # a list left by an earlier, killed attempt at this shard
        skipped_file.unlink(missing_ok=True)
    for name in arrays:
        write_array(args.staging / f"{name}_{shard:05d}.npy", arrays[name].numpy())
    names = latents.shard_files(shard, flip)
    write_json(digests_file(args.staging, shard), {name: runtime.file_digest(args.staging / name) for name in names})
    progress.advance(0, shard=shard)


def finish(args, plan):
    """Rank 0, every shard written: skipped.txt, the statistics file (store sample), prepare.json with the digest of
    every array file (ref.latents.TrainingLatents verifies them), then the staging folder renamed to args.out."""
    staging, shards = args.staging, range(plan.num_shards)
    skipped = "".join((staging / f"skipped_{k:05d}.txt").read_text() for k in shards
                      if (staging / f"skipped_{k:05d}.txt").is_file())
    items = sum(len(np.load(staging / f"labels_{k:05d}.npy", mmap_mode="r")) for k in shards)
    if items == 0:
        runtime.exit_with_error(f"none of the {len(plan.images.files)} images in {args.data_path} could be read")
    runtime.atomic_write(staging / "skipped.txt", lambda file: file.write(skipped.encode()))
    digests = {}
    for k in shards:
        digests.update(json.loads(digests_file(staging, k).read_text()))
    if args.store == "sample":  # LightningDiT's latent normalisation: statistics of the unmirrored latents
        statistics = latents.channel_statistics(np.load(staging / f"latents_{k:05d}.npy", mmap_mode="r")
                                                for k in shards)
        runtime.atomic_write(staging / latents.STATS_FILE, lambda file: torch.save(statistics, file))
        digests[latents.STATS_FILE] = runtime.file_digest(staging / latents.STATS_FILE)
    write_json(staging / "prepare.json", dict(plan.settings, items=items, skipped=skipped.count("\n"), digests=digests))
    os.replace(staging, args.out)  # atomic; replaces an empty args.out
    for leftover in [args.out / "settings.json", *args.out.glob("skipped_*.txt"), *args.out.glob("digests_*.json")]:
        leftover.unlink()
    print(f"{items} images{' and their mirrors' if args.flip else ''} in {plan.num_shards} shards: {args.out}; "
          f"{skipped.count(chr(10))} skipped (skipped.txt)", flush=True)


def prepare_latents(args, world):
    try:  # bad input stops here, before anything is written
        plan = make_plan(args)
    except ValueError as error:
        runtime.exit_with_error(error)
    if plan is None:
        if world.is_main:
            print(f"{args.out} already holds this preparation; nothing to do", flush=True)
        return
    plan.vae.to(world.device)
    if world.is_main:
        args.staging.mkdir(parents=True, exist_ok=True)
        if not (args.staging / "settings.json").is_file():
            write_json(args.staging / "settings.json", plan.settings)
    barrier()
    todo = [shard for shard in range(world.rank, plan.num_shards, world.world_size)
            if not shard_intact(args.staging, shard)]
    todo = todo[:args.stop_after_shards]  # None: all
    progress = Progress(sum(min(args.shard_size, len(plan.images.files) - shard * args.shard_size) for shard in todo),
                        world.is_main)
    if world.is_main:
        print(f"{len(plan.images.files)} images in {len(plan.images.classes)} classes, {plan.num_shards} shards, "
              f"{world.world_size} rank(s) on {world.device.type}; rank 0 encodes {len(todo)} shard(s) of its share "
              f"into {args.staging}", flush=True)
    for shard in todo:
        encode_shard(args, plan, shard, world.device, progress)
    barrier()
    if world.is_main:
        if all(shard_done(args.staging, shard) for shard in range(plan.num_shards)):
            finish(args, plan)
        else:
            print(f"stopped with shards left (--stop-after-shards); rerun to continue in {args.staging}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    with runtime.distributed() as world:
        prepare_latents(args, world)


if __name__ == "__main__":
    main()
