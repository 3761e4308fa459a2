"""Speed of DiT / SiT with the Internal Guidance head: forward+backward time, training-step throughput, sampling time
per guidance mode, and MFU from counted FLOPs.

Usage (from the repository root):
    python -m bench.dit_speed --model DiT-S/2 --image-size 32 --channels 3 --batch 8             # 32 px pixel space
    python -m bench.dit_speed --model DiT-XL/2 --image-size 32 --channels 4 --batch 64 --device cuda --dtype bf16
                                                                                 # 256 px images in SD-VAE latent space

The network input is (channels, image-size, image-size): pixel space is 3 channels at the image's side; a 256 px image
in SD-VAE latent space is 4 x 32 x 32 (the VAE itself is not timed). The model is SiT-X/p of the IG release: the IG head
after the paper's block (IG_HEAD_BLOCK), --num-classes classes plus the null label.

Timed in --repeats rounds, each running every measurement once in turn after a warm-up round; each figure is its
fastest round, the one least disturbed by other work on the machine (interleaving keeps the ratios fair under load):
  - forward+backward of the flow-matching loss with the IG term (ref/losses.py), per image;
  - a training step: label dropout 0.1, forward+backward, gradient clipping at 1, AdamW, EMA update; images/s;
  - one network evaluation per guidance mode through ref/guidance.guided_denoiser on the EMA model: none, IG (both
    heads come from the one pass), CFG and IG+CFG (conditional and unconditional halves in one batch of twice the
    images), per sampled image; and the whole Euler-Maruyama sampler of --sampler-steps steps per mode, with the
    network evaluations it made per image, counted: IG+CFG on the IG release's CFG interval [0, 0.7] runs the
    unconditional branch only at the steps inside it.
On CUDA: TF32 matmuls and convolutions, and with --dtype bf16 the network runs under the bf16 autocast of training
and sampling (ref/runtime.autocast; weights and optimiser stay float32). The CPU runs float32.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one forward (sampling) and one forward+backward
(training) at the benchmark batch. While counting, attention runs on SDPA's math backend, whose matmuls the counter
sees (torch has no FLOP formula for the fused CPU kernel); the backward is counted as plain matmul gradients, without
a fused kernel's recomputation. MFU = counted FLOPs / time / peak, peak from --peak-tflops, else the dense bf16 peak
of a known GPU (ref/runtime.peak_flops, the table train.py's MFU uses; a --dtype fp32 run is measured against it too),
else (the CPU, an unknown GPU) the "measured peak": the best throughput of a 2048 x 2048 matmul on the device in the
benchmark dtype, timed before every measurement (so a CPU's MFU is against what its BLAS reaches on this machine at
its least loaded, not a vendor figure).
"""
import argparse
import copy
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ref.arguments import usable_device
from ref.dit import IG_HEAD_BLOCK, MODELS, count_parameters
from ref.ema import update_ema
from ref.guidance import guided_denoiser
from ref.losses import drop_labels, flow_matching_loss
from ref.runtime import autocast, exit_with_error, peak_flops
from ref.samplers import euler_maruyama, uniform_grid

GUIDANCE_MODES = {  # guided_denoiser weights; the IG release's SiT-XL/2 values (w = 1.4, s = 1.35 together)
    "none": {},
    "IG": {"w_ig": 1.4},
    "CFG": {"w_cfg": 1.35},
    "IG+CFG": {"w_ig": 1.4, "w_cfg": 1.35},
    "IG+CFG, CFG on [0, 0.7]": {"w_ig": 1.4, "w_cfg": 1.35, "cfg_interval": (0.0, 0.7)},  # the release's gen.sh
}


# ---------------------------------------------------------------------------------------------------------------------
# Timing, FLOPs, peak
# ---------------------------------------------------------------------------------------------------------------------

def fastest_times(runs, device, rounds, untimed=()):
    """runs: (name, run) pairs, a name possibly more than once -> {name: the fastest wall time of its runs, seconds}.
    The list runs `rounds` times, after one untimed warm-up pass that skips the names in `untimed`. Interleaving lets
    a change in the machine's load hit every measurement alike, so their ratios hold better than their times."""
    def seconds(run):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    for name, run in runs:
        if name not in untimed:
            seconds(run)
    fastest = {}
    for _ in range(rounds):
        for name, run in runs:
            fastest[name] = min(fastest.get(name, float("inf")), seconds(run))
    return fastest


def counted_flops(run):
    """FLOPs of run() as FlopCounterMode counts them, attention on SDPA's math backend (plain, counted matmuls)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------------

def guided_runs(ema, y, weights, shape, device, args, mixed_precision, counts):
    """(one guided evaluation of the noise at t = 0.5, the whole sampler) for one guidance mode; counts: [network
    rows, sampler runs] of the sampler's runs, updated in place."""
    batch = len(y)
    denoise = guided_denoiser(ema, y, null_y=args.num_classes, **weights)
    noise = torch.randn(batch, *shape, device=device)
    t = torch.full((batch,), 0.5, device=device)
    grid = uniform_grid(args.sampler_steps)

    def counted_network(x, t, labels):
        counts[0] += len(x)
        return ema(x, t, labels)
    counted = guided_denoiser(counted_network, y, null_y=args.num_classes, **weights)

    @torch.inference_mode()
    def evaluate():
        with mixed_precision:
            denoise(noise, t)

    @torch.inference_mode()
    def sample():
        counts[1] += 1
        with mixed_precision:
            euler_maruyama(counted, noise, grid)
    return evaluate, sample


def training_runs(model, ema, optimizer, x0, y, num_classes, mixed_precision, net=None):
    """(forward_backward, training_step) on the batch x0 (B, C, S, S), labels y: the flow-matching loss with the IG
    term under label dropout 0.1, forward and backward; the step adds gradient clipping at 1, AdamW and the EMA
    update. net: what runs the forward (a torch.compile of model), default model."""
    net = model if net is None else net

    def forward_backward():
        t, eps = torch.rand(len(x0), device=x0.device), torch.randn_like(x0)
        with mixed_precision:
            loss = flow_matching_loss(net, x0, t, drop_labels(y, 0.1, num_classes), eps).mean()
        loss.backward()

    def training_step():
        forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9999)
    return forward_backward, training_step


def main(args):
    try:
        device = usable_device(args.device)
    except ValueError as error:
        exit_with_error(error)
    if device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    elif args.dtype == "bf16":
        raise SystemExit("error: --dtype bf16 is the CUDA path (bf16 autocast); the CPU runs fp32")
    mixed_precision = autocast(device, bf16=args.dtype == "bf16")
    torch.manual_seed(0)
    with torch.device("meta"):
        depth = len(MODELS[args.model]().blocks)
    model = MODELS[args.model](input_size=args.image_size, in_channels=args.channels, num_classes=args.num_classes,
                               intermediate_block=IG_HEAD_BLOCK[depth]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    batch, shape = args.batch, (args.channels, args.image_size, args.image_size)
    x0 = torch.randn(batch, *shape, device=device)  # (B, C, S, S) stands in for data; speed does not depend on it
    y = torch.randint(args.num_classes, (batch,), device=device)
    forward_backward, training_step = training_runs(model, ema, optimizer, x0, y, args.num_classes, mixed_precision)
    evaluations = {mode: [0, 0] for mode in GUIDANCE_MODES}  # per mode: [network rows, sampler runs]

    runs = {"forward+backward": forward_backward, "training step (AdamW + EMA)": training_step}
    for mode, weights in GUIDANCE_MODES.items():
        runs[f"eval {mode}"], runs[f"sampler {mode}"] = guided_runs(ema, y, weights, shape, device, args,
                                                                    mixed_precision, evaluations[mode])
    flops = {"training": counted_flops(forward_backward) / batch}  # per image
    optimizer.zero_grad(set_to_none=True)
    flops.update({mode: counted_flops(runs[f"eval {mode}"]) / batch for mode in GUIDANCE_MODES})

    seconds, peak, peak_source = time_runs(runs, device, args)
    print_report(args, model, depth, shape, device, seconds, flops, evaluations, peak, peak_source)


def time_runs(runs, device, args):
    """-> (seconds per image of each run, fastest of the rounds; peak FLOP/s; where the peak comes from)."""
    peak = peak_flops(device, args.peak_tflops)  # None on the CPU or an unknown GPU: measured below
    timed_runs = list(runs.items())
    if peak is None:  # a large matmul, timed before each measurement in every round
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        a, b = (torch.randn(2048, 2048, device=device, dtype=dtype) for _ in range(2))
        timed_runs = [pair for name_run in runs.items() for pair in (("peak matmul", lambda: a @ b), name_run)]
    seconds = fastest_times(timed_runs, device, args.repeats, untimed=[f"sampler {mode}" for mode in GUIDANCE_MODES])
    if peak is None:
        peak_source = f"measured: 2048^3 {args.dtype} matmul" + (f", {torch.get_num_threads()} threads"
                                                                   if device.type == "cpu" else "")
        peak = 2 * 2048 ** 3 / seconds.pop("peak matmul")
    else:
        peak_source = "--peak-tflops" if args.peak_tflops else "dense bf16 peak of the data sheet"
    return {name: value / args.batch for name, value in seconds.items()}, peak, peak_source  # per image


def print_report(args, model, depth, shape, device, seconds, flops, evaluations, peak, peak_source):
    """The training and sampling tables: time per image, images/s, GFLOP per image, MFU, NFE."""
    batch = args.batch
    tokens = (args.image_size // model.patch_size) ** 2
    print(f"{args.model} with the IG head after block {model.intermediate_block}/{depth}, "
          f"{count_parameters(model) / 1e6:.1f}M parameters; input {'x'.join(map(str, shape))} ({tokens} tokens); "
          f"batch {batch}; {device} {args.dtype}; fastest of {args.repeats} rounds"
          + (f"; {torch.get_num_threads()} threads" if device.type == "cpu" else f" ({torch.cuda.get_device_name()})"))
    print(f"peak {peak / 1e12:.3f} TFLOP/s ({peak_source})\n")
    mfu = lambda flops_per_image, seconds_per_image: f"{100 * flops_per_image / seconds_per_image / peak:>6.1f}%"
    print(f"{'training':30} {'ms/image':>10} {'images/s':>10} {'GFLOP/image':>12} {'MFU':>7}")
    for name in ("forward+backward", "training step (AdamW + EMA)"):
        print(f"{name:30} {1e3 * seconds[name]:>10.2f} {1 / seconds[name]:>10.2f} {flops['training'] / 1e9:>12.2f} "
              f"{mfu(flops['training'], seconds[name])}")

    print(f"\n{'sampling (EMA model)':24} {'ms/image/eval':>14} {'vs none':>8} {'GFLOP/image':>12} {'MFU':>7} "
          f"{f'{args.sampler_steps}-step EM s/image':>22} {'vs none':>8} {'NFE/image':>10}")
    for mode in GUIDANCE_MODES:
        evaluation, sampler = seconds[f"eval {mode}"], seconds[f"sampler {mode}"]
        rows, sampler_runs = evaluations[mode]
        print(f"{mode:24} {1e3 * evaluation:>14.2f} {evaluation / seconds['eval none']:>7.2f}x "
              f"{flops[mode] / 1e9:>12.2f} {mfu(flops[mode], evaluation)} {sampler:>22.3f} "
              f"{sampler / seconds['sampler none']:>7.2f}x {rows / (sampler_runs * batch):>10g}")
    if device.type == "cuda":
        print(f"\npeak CUDA memory (training and sampling): {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=32, help="side of the network input (latent side if latent)")
    parser.add_argument("--channels", type=int, default=3, help="3: pixel space; 4: SD-VAE latents")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8, help="images per training step and per sampled batch")
    parser.add_argument("--sampler-steps", type=int, default=250, help="Euler-Maruyama steps (IG default 250)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: CUDA bf16 autocast")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s of the device in TFLOP/s, for MFU")
    main(parser.parse_args())
