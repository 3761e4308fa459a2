"""Train a DiT / SiT with the Internal Guidance head (Zhou et al., arXiv 2512.24176).

    python train.py --config shapes-tiny [--steps N] [--batch-size B] [--lr LR] [--out DIR] [...]
    torchrun --nproc_per_node=N train.py --config sit-xl2-imagenet --data-path LATENT_SHARDS [...]

Named configs and their fields live in ref/training.py (CONFIGS); every field is a flag (--help lists them). The
objective is flow matching with the velocity target (SiT / the IG release, t ~ U(0, 1)) or DDPM eps (DiT), each with
the IG auxiliary term lambda ||D_i - target||^2 when the model has the intermediate head (ref/losses.py). AdamW
(betas 0.9, 0.999, no weight decay), gradient clipping, label dropout for CFG, EMA weights; bf16 autocast and TF32 on
CUDA. Rerun the same command to resume from OUT/latest.pt: the data order and every random draw are functions of the
seed and the step, so the resumed run is bitwise the uninterrupted one. Rank 0 writes OUT/latest.pt (atomically),
OUT/log.txt and OUT/metrics.jsonl (loss, images/s, MFU). Bad input: a message and exit status 2, nothing written.
"""
import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ref import training
from ref.data import stream_positions
from ref.dit import count_parameters
from ref.ema import update_ema
from ref.losses import ddpm_eps_loss, drop_labels, flow_matching_loss
from ref.schedules import DDPMSchedule


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_config_flags(parser)
    parser.add_argument("--out", help="run folder (default runs/<config>)")
    args = parser.parse_args(argv)
    return training.resolve_config(args), Path(args.out or f"runs/{args.config}")


def sample_draws(config, schedule, y, input_shape, positions):
    """The random draws of each sample from its own generator, seeded by (seed, place in the data stream), on the
    CPU: the label dropped to the null label with probability label_dropout, then t, then the noise. -> y, t, eps"""
    draws = training.SampleDraws(training.stream_seed(config["seed"], position) for position in positions)
    y = torch.cat([drop_labels(label[None], config["label_dropout"], config["num_classes"], generator)
                   for label, generator in zip(y, draws.generators)])  # (N,), null label = num_classes
    t = draws.rand() if schedule is None else draws.randint(schedule.num_timesteps)  # (N,) U(0, 1) or U{0..T-1}
    return y, t, draws.randn(*input_shape)  # eps (N, C, H, W)


def train(config, out, dist):
    checkpoint_path = out / "latest.pt"
    try:  # bad input stops here, before anything is written
        dataset = training.make_dataset(config)
        if config["objective"] not in ("flow", "eps"):
            raise ValueError(f"unknown objective {config['objective']!r}; choose flow or eps")
        schedule = DDPMSchedule.named(config["beta_schedule"]) if config["objective"] == "eps" else None
        stream_positions(0, config["batch_size"], dist.rank, dist.world_size)  # checks the batch splits over ranks
        checkpoint = training.read_run_checkpoint(checkpoint_path) if checkpoint_path.exists() else None
        if checkpoint is not None:
            training.check_resumable(checkpoint["args"], config, checkpoint_path)
        torch.manual_seed(config["seed"])  # the initial weights
        model = training.build_model(config).to(dist.device)
    except ValueError as error:
        training.exit_with_error(error)

    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], betas=(0.9, 0.999), weight_decay=0)
    start = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["opt"])
        start = checkpoint["step"]
    stop = min(config["steps"], config["stop_after"] or config["steps"])
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    log = training.RunLog(out, dist.is_main, resumed_step=start if checkpoint else None)
    flops_per_image = training.training_flops_per_image(config)
    peak = training.peak_flops(dist.device, config["peak_tflops"])
    log.line(f"{'resumed at step ' + str(start) if checkpoint else 'new run'} in {out}: {dist.world_size} rank(s) on "
             f"{dist.device.type}, {count_parameters(model):,} parameters, "
             f"{flops_per_image / 1e9:.3f} GFLOP per image (forward + backward)\nconfig {json.dumps(config)}")

    net = torch.compile(model) if config["compile"] else model  # compile before the DDP wrap (nanoGPT)
    if dist.world_size > 1:
        net = DistributedDataParallel(net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    loader = DataLoader(dataset, batch_sampler=training.StepBatches(start, stop, config["batch_size"], dist.rank,
                                                                    dist.world_size, config["seed"], len(dataset)),
                        collate_fn=training.collate_inputs_labels, num_workers=config["workers"],
                        pin_memory=dist.device.type == "cuda")
    run_start = interval_start = time.perf_counter()
    loss_sum, interval_steps = torch.zeros((), device=dist.device), 0
    batches = iter(loader)
    for step in range(start, stop):
        try:
            x, y = next(batches)  # (N, C, H, W), (N,)
        except ValueError as error:  # an image file that cannot be decoded
            training.exit_with_error(error)
        positions = stream_positions(step, config["batch_size"], dist.rank, dist.world_size)
        y, t, eps = sample_draws(config, schedule, y, x.shape[1:], positions)
        x, y, t, eps = (tensor.to(dist.device, non_blocking=True) for tensor in (x, y, t, eps))
        with training.autocast(dist.device, config["bf16"]):
            if schedule is None:
                loss = flow_matching_loss(net, x, t, y, eps, config["aux_weight"]).mean()
            else:
                loss = ddpm_eps_loss(net, schedule, x, t, y, eps, config["aux_weight"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients over the ranks: the gradient of the global batch mean
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        optimizer.step()
        update_ema(ema, model, config["ema_decay"])
        loss_sum += loss.detach()
        interval_steps += 1
        done = step + 1

        if done % config["log_every"] == 0 or done == stop:
            mean_loss = training.all_reduce_mean(loss_sum / interval_steps).item()
            now = time.perf_counter()
            images_per_second = interval_steps * config["batch_size"] / (now - interval_start)
            mfu = flops_per_image * images_per_second / (peak * dist.world_size) if peak else None
            eta = (now - run_start) / (done - start) * (stop - done)
            log.line(f"step {done}/{config['steps']}  loss {mean_loss:.4f}  {images_per_second:.1f} img/s  "
                     f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}  elapsed "
                     f"{training.format_seconds(now - run_start)}  ETA {training.format_seconds(eta)}")
            log.metrics(dict(step=done, images=done * config["batch_size"], loss=mean_loss,
                             grad_norm=grad_norm.item(), images_per_second=images_per_second, mfu=mfu,
                             seconds=now - run_start))
            loss_sum.zero_()
            interval_start, interval_steps = time.perf_counter(), 0
        if dist.is_main and (done % config["checkpoint_every"] == 0 or done == stop):
            training.save_checkpoint(checkpoint_path, model, ema, optimizer, done, config)

    if start >= stop:
        log.line(f"nothing to train: {checkpoint_path} is at step {start}")
    elif stop < config["steps"]:
        log.line(f"stopped after step {stop} of {config['steps']} (--stop-after); rerun without it to continue")
    # Equal digests on every rank show the replicas stayed bitwise in step.
    print(f"rank {dist.rank}: weights sha256 {training.weights_digest(model.state_dict())}", flush=True)


def main(argv=None):
    config, out = parse_args(argv)
    with training.distributed() as dist:
        train(config, out, dist)


if __name__ == "__main__":
    main()
