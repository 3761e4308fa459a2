"""The one training loop of both papers' runs (`fit`): AdamW (constant lr, or a final linear decay), gradient
clipping, EMA, bf16 autocast on CUDA, DDP over the ranks, exact resume, progress, the run log, snapshots and the MFU.

A run (the IG run in ref/internal_guidance.py, the testbed's runs in shapes/runs.py) is a class made from its config
that gives what the loop needs: `make_dataset()`, `build()` the trainable network, `collate(samples)` -> a batch of
CPU tensors, `to(device)` for its frozen partners, and `loss(net, batch, draws, device)` -> the (B,) per-sample loss
of its paper's training step, each sample's random draws taken from `draws` (ref.runtime.SampleDraws). A run whose
step reads the EMA weights (IG's accelerated training) has `use_ema(ema)`, and the loop hands it its EMA network; a
run's `added_fields`, if any, are the old defaults of fields it gained after checkpoints were written.
"""
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from torch.utils.flop_counter import FlopCounterMode

from ref.arguments import writable_folder
from ref.configs import check_resumable, check_values
from ref.data import batch_indices, stream_positions
from ref.dit import count_parameters
from ref.ema import update_ema
from ref.runtime import (RunLog, SampleDraws, all_reduce_mean, autocast, exit_with_error, format_seconds, peak_flops,
                         read_run_checkpoint, save_checkpoint, stream_seed, weights_digest)


class StepBatches(Sampler):
    """This rank's dataset indices for steps [start, stop), one list per step (ref.data.batch_indices)."""

    def __init__(self, start, stop, batch_size, rank, world_size, seed, num_items):
        self.steps = range(start, stop)
        self.batch_args = batch_size, rank, world_size, seed, num_items

    def __len__(self):
        return len(self.steps)

    def __iter__(self):
        for step in self.steps:
            yield batch_indices(step, *self.batch_args).tolist()


# A rank's forward + backward FLOPs a step below which a CPU run takes one thread per process unless OMP_NUM_THREADS
# says otherwise: shapes-tiny (6 GFLOP a step) ran 10x faster so on 2 shared cores (README, "Threads").
SMALL_STEP_FLOPS = 100e9


def choose_threads(config, world, flops_per_image):
    """One thread per process for a small run on the CPU when the user has not set OMP_NUM_THREADS (torchrun sets
    it to 1 itself). -> the line the log says it in, or None."""
    step_flops = flops_per_image * config["batch_size"] / world.world_size
    if world.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or step_flops >= SMALL_STEP_FLOPS:
        return None
    torch.set_num_threads(1)
    return (f"1 thread per process: {step_flops / 1e9:.1f} GFLOP a step is small, and more threads only fight over "
            f"shared cores (set OMP_NUM_THREADS to choose)")


def snapshot_path(out, step, config):
    """out/snapshot-<images seen>.pt when this step's image count, step x batch size, reaches a multiple of
    snapshot_every (every count in images, as EDM2: the snapshots of two runs are comparable at any batch size);
    else None. Nine digits, so the names sort in training order up to 10^9 images."""
    every, images = config["snapshot_every"], step * config["batch_size"]
    if every and images // every > (images - config["batch_size"]) // every:
        return Path(out) / f"snapshot-{images:09d}.pt"
    return None


def hand_over_ema(run, ema):
    """Give the EMA network to a run that asks for it (`use_ema`)."""
    if hasattr(run, "use_ema"):
        run.use_ema(ema)


def training_flops_per_image(make_run, config, dataset):
    """Model FLOPs of one training forward + backward pass per image, counted by torch.utils.flop_counter on the meta
    device (no memory, no compute; there attention takes the math path, whose matmuls are counted: the CPU flash kernel
    has no FLOP formula): the run's loss on one sample of `dataset`, frozen partners and an EMA pass included. Without
    gradient checkpointing: its recomputation is not model FLOPs."""
    with torch.device("meta"):
        run = make_run(dict(config, gradient_checkpointing=False), load=False)
        net = run.build()
        hand_over_ema(run, copy.deepcopy(net).requires_grad_(False))
    with FlopCounterMode(display=False) as counter:
        run.loss(net, run.collate([dataset[0]]), SampleDraws([0]), torch.device("meta")).sum().backward()
    return counter.get_total_flops()


def start(make_run, config, out, world):
    """Everything that can refuse bad input, before anything is written: the run, its data, the network on the
    device, the checkpoint to resume (or None), the FLOPs per image; then the run folder, created. Bad input: a message
    and exit status 2."""
    try:
        check_values(config)
        run = make_run(config)
        dataset = run.make_dataset()
        share = stream_positions(0, config["batch_size"], world.rank, world.world_size)  # checks the batch splits
        check_accumulation(len(share), config.get("grad_accumulation", 1))
        checkpoint, checkpoint_path = resume_checkpoint(out)
        if checkpoint is not None:  # a field the run added since the checkpoint was written: its old default
            check_resumable(dict(getattr(run, "added_fields", {}), **checkpoint["args"]), config, checkpoint_path)
            if world.is_main:
                warn_if_lr_history_differs(checkpoint["args"], config, checkpoint["step"], checkpoint_path)
        torch.manual_seed(config["seed"])  # the initial weights
        model = run.build().to(world.device)
        run.to(world.device)
        flops_per_image = training_flops_per_image(make_run, config, dataset)  # reads one sample: a bad file stops here
        if world.is_main:
            writable_folder(out)
    except ValueError as error:
        exit_with_error(error)
    return run, dataset, model, checkpoint, flops_per_image


def resume_checkpoint(out):
    """The checkpoint a rerun resumes from, and its path: out/latest.pt, or, when that cannot be read or is damaged
    (its digests, ref.runtime.verify_digests), the newest snapshot that can, said on stderr; (None, None) for a new
    run. Without an intact snapshot latest.pt's error is raised."""
    latest = out / "latest.pt"
    if not latest.exists():
        return None, None
    try:
        return read_run_checkpoint(latest), latest
    except ValueError as error:
        for snapshot in sorted(out.glob("snapshot-*.pt"), reverse=True):  # nine-digit image counts: newest first
            try:
                checkpoint = read_run_checkpoint(snapshot)
            except ValueError as snapshot_error:
                print(f"warning: {snapshot_error}", file=sys.stderr)
                continue
            print(f"warning: {error}; resuming from {snapshot} (step {checkpoint['step']}), the newest intact "
                  f"snapshot", file=sys.stderr, flush=True)
            return checkpoint, snapshot
        raise error from None


def check_accumulation(share, micro_batches):
    if share % micro_batches:
        raise ValueError(f"--grad-accumulation {micro_batches} does not divide a rank's {share} samples of the batch "
                         f"into equal micro-batches")


def accumulate_gradients(run, net, batch, positions, config, world):
    """Forward and backward passes of a rank's share of the batch in config["grad_accumulation"] equal micro-batches
    (default 1: all at once), each sample with its own draws: the gradients sum to those of the share's mean loss
    (DDP averages over the ranks on the last micro-batch's backward). -> the mean loss, detached."""
    micro_batches = config.get("grad_accumulation", 1)
    size = len(positions) // micro_batches
    mean_loss = 0
    for index in range(micro_batches):
        rows = slice(index * size, (index + 1) * size)
        draws = SampleDraws(stream_seed(config["seed"], position) for position in positions[rows])
        last = index == micro_batches - 1
        with contextlib.nullcontext() if last or world.world_size == 1 else net.no_sync():
            with autocast(world.device, config["bf16"]):
                loss = run.loss(net, tuple(tensor[rows] for tensor in batch), draws, world.device).mean()
            if micro_batches > 1:
                loss = loss / micro_batches
            loss.backward()  # DDP averages the gradients over the ranks: the gradient of the global batch mean
        mean_loss = mean_loss + loss.detach()
    return mean_loss


def learning_rate(config, step):
    """The lr of 0-based training step `step`: constant, then over the run's last lr_decay_steps steps falling
    linearly towards 0 (the last step at lr / lr_decay_steps)."""
    decay = config["lr_decay_steps"]
    return config["lr"] * (min(1.0, (config["steps"] - step) / decay) if decay else 1.0)


def warn_if_lr_history_differs(stored, config, step, path):
    """Say on stderr when the steps a resumed run has trained (0 .. step - 1) had another lr under its stored steps and
    lr_decay_steps than one run with the given ones gives them (a decayed run given more --steps, say): the continued
    run is then not that one run."""
    starts = [run["steps"] - run["lr_decay_steps"] if run["lr_decay_steps"] else step for run in (stored, config)]
    differing = [s for s in range(max(0, min(starts)), step) if learning_rate(stored, s) != learning_rate(config, s)]
    if differing:
        print(f"warning: {path} trained steps 0-{step - 1} with --steps {stored['steps']} --lr-decay-steps "
              f"{stored['lr_decay_steps']}; one run with --steps {config['steps']} --lr-decay-steps "
              f"{config['lr_decay_steps']} has another lr from step {differing[0]} on, so the continued run is not that "
              f"run (a new --out trains it)", file=sys.stderr, flush=True)


def fit(make_run, config, out, world):
    """Train the run `make_run(config)` into `out`: AdamW (betas 0.9, adam_beta2, weight_decay; `learning_rate`),
    gradient clipping, EMA, bf16 autocast on CUDA, DDP over the ranks, optional torch.compile; resume from
    out/latest.pt; progress, log.txt, metrics.jsonl and the numbered snapshots on rank 0 (latest.pt is rewritten with
    each snapshot)."""
    run, dataset, model, checkpoint, flops_per_image = start(make_run, config, out, world)
    ema = copy.deepcopy(model).requires_grad_(False)
    hand_over_ema(run, ema)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], betas=(0.9, config["adam_beta2"]),
                                  weight_decay=config["weight_decay"])
    first = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["opt"])
        first = checkpoint["step"]
    stop = min(config["steps"], config["stop_after"] or config["steps"])
    log = RunLog(out, world.is_main, resumed_step=first if checkpoint else None)
    log.line(f"{'resumed at step ' + str(first) if checkpoint else 'new run'} in {out}: {config['job']} job, "
             f"{world.world_size} rank(s) on {world.device.type}, {count_parameters(model):,} trained parameters, "
             f"{flops_per_image / 1e9:.3f} GFLOP per image (forward + backward)\nconfig {json.dumps(config)}")
    threads = choose_threads(config, world, flops_per_image)
    if threads:
        log.line(threads)

    net = torch.compile(model) if config["compile"] else model  # compile before the DDP wrap (nanoGPT)
    if world.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    loader = DataLoader(dataset, batch_sampler=StepBatches(first, stop, config["batch_size"], world.rank,
                                                           world.world_size, config["seed"], len(dataset)),
                        collate_fn=run.collate, num_workers=config["workers"], pin_memory=world.device.type == "cuda")
    progress = Progress(config, world, log, flops_per_image, first, stop)
    batches = iter(loader)
    for step in range(first, stop):
        try:
            batch = next(batches)  # a tuple of CPU tensors, the run's collate
        except ValueError as error:  # an image file that cannot be decoded
            exit_with_error(error)
        positions = stream_positions(step, config["batch_size"], world.rank, world.world_size)
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate_gradients(run, net, batch, positions, config, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        optimizer.step()
        update_ema(ema, model, config["ema_decay"])
        done = step + 1
        progress.update(done, loss, grad_norm)
        snapshot = snapshot_path(out, done, config)
        if world.is_main and snapshot:  # before latest.pt: a kill between the two makes the resumed run rewrite it
            save_checkpoint(snapshot, model, ema, optimizer, done, config)
        if world.is_main and (done % config["checkpoint_every"] == 0 or done == stop or snapshot):
            save_checkpoint(out / "latest.pt", model, ema, optimizer, done, config)

    if first >= stop:
        log.line(f"nothing to train: {out / 'latest.pt'} is at step {first}")
    elif stop < config["steps"]:
        log.line(f"stopped after step {stop} of {config['steps']} (--stop-after); rerun without it to continue")
    # Equal digests on every rank show the replicas stayed bitwise in step.
    print(f"rank {world.rank}: weights sha256 {weights_digest(model.state_dict())}", flush=True)


class Progress:
    """The progress line and metrics.jsonl entry every log_every steps and at the last: the mean loss over the ranks
    and the steps since the last line, images/s, MFU, elapsed time and ETA."""

    def __init__(self, config, world, log, flops_per_image, first, stop):
        self.config, self.world, self.log, self.flops_per_image = config, world, log, flops_per_image
        self.first, self.stop = first, stop
        self.peak = peak_flops(world.device, config["peak_tflops"])
        self.run_start = self.interval_start = time.perf_counter()
        self.loss_sum, self.interval_steps = torch.zeros((), device=world.device), 0

    def update(self, done, loss, grad_norm):
        config = self.config
        self.loss_sum += loss.detach()
        self.interval_steps += 1
        if done % config["log_every"] and done != self.stop:
            return
        mean_loss = all_reduce_mean(self.loss_sum / self.interval_steps).item()
        now = time.perf_counter()
        images_per_second = self.interval_steps * config["batch_size"] / (now - self.interval_start)
        peak = self.peak
        mfu = self.flops_per_image * images_per_second / (peak * self.world.world_size) if peak else None
        eta = (now - self.run_start) / (done - self.first) * (self.stop - done)
        self.log.line(f"step {done}/{config['steps']}  loss {mean_loss:.4f}  {images_per_second:.1f} img/s  "
                      f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}  elapsed "
                      f"{format_seconds(now - self.run_start)}  ETA {format_seconds(eta)}")
        self.log.metrics(dict(step=done, images=done * config["batch_size"], loss=mean_loss,
                              grad_norm=grad_norm.item(), images_per_second=images_per_second, mfu=mfu,
                              seconds=now - self.run_start))
        self.loss_sum.zero_()
        self.interval_start, self.interval_steps = time.perf_counter(), 0
