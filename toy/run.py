"""The main job: reproduce Internal Guidance's outlier reduction on the 2D fractal mixture, measured out of sample.

    python -m toy.run [--out runs/toy] [--seed 0] [--seeds 3] [--config full|long|quick] [--quick]
                      [--parameterisation energy|velocity] [--target exact|noisy] [--workers 2]

1. Selection: for each selection seed (training seeds SELECTION_SEED + i, their own initial noise), train the main
   MLP (with its IG head and label dropout) and the smaller, shorter-trained autoguidance guide, sample class A with
   every method over its sweep of guidance weights and score each sample set against the exact mixture. Each method's
   weight is its lowest-outlier one (mean over the selection seeds) among those keeping recall >= RECALL_FLOOR x
   unguided.
2. Held out: for the training seeds --seed .. --seed + --seeds - 1, train afresh and sample each method at its chosen
   weight only, from fresh initial noise. These are the numbers reported, with each seed's outlier reduction.
Every model trains from one pool of training points with their exact targets (toy/training.py), drawn once by the
workers; the selection seed and the held-out seeds differ in initialisation and minibatch order, not in data.
Work is spread over --workers processes of one thread each and the main process (one thread): the workers draw the pool
and train every seed's models while the main process builds the ground truth, samples the exact denoiser, sweeps the
selection seed and measures the first held-out seed; the workers then measure the other held-out seeds.
Writes metrics.json, samples.npz (the first held-out seed) and toy.png under --out.
"""
import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from ref import guidance, samplers
from ref.arguments import writable_folder
from ref.metrics import OutlierRate, logp_outlier_rate, precision_recall
from ref.runtime import exit_with_error
from toy.mixture import fractal_mixture
from toy.model import HEADS, ToyDenoiser
from toy.plot import density_image, draw_panels
from toy.training import TARGETS, target_pool, train

WEIGHTS = [1.25, 1.5, 2.0]  # every method's sweep; w = 2 already fails the recall floor (docs/toy.md)
SWEEP = dict(ig_weights=WEIGHTS, autoguidance_weights=WEIGHTS, cfg_weights=WEIGHTS,
             ig_cfg_weights=[(w, 1.5) for w in WEIGHTS])
# The guide: half the width, 1/8 of the iterations (the Autoguidance toy's 512 vs 4096). Every model draws its batches
# from one pool of pool_size points with their exact targets; the lr decays as 1/sqrt after lr_decay_start.
MEASURES = dict(samples=6000, selection_samples=3000, exact_samples=1000, selection_seeds=1, heun_steps=32)
CONFIGS = {
    "full": dict(main_iterations=2560, guide_iterations=320, lr_decay_start=1024, batch=1024, pool_size=1 << 18,
                 pool_parts=2, **MEASURES, **SWEEP),
    "long": dict(main_iterations=4096, guide_iterations=512, lr_decay_start=512, batch=1024, pool_size=1 << 19,
                 pool_parts=2, **MEASURES, **SWEEP),
    "quick": dict(main_iterations=384, guide_iterations=48, lr_decay_start=512, batch=128, pool_size=1 << 14,
                  pool_parts=2, samples=3000, selection_samples=2000, exact_samples=1000, selection_seeds=1,
                  heun_steps=32, ig_weights=[1.5, 2.0], autoguidance_weights=[2.0], cfg_weights=[1.5],
                  ig_cfg_weights=[(1.5, 1.5)]),
}
REFERENCE_SIZE, HELD_OUT_SIZE, PR_SIZE = 100_000, 20_000, 5_000
RECALL_FLOOR = 0.9  # a weight counts only when it keeps recall >= 90% of unguided
SELECTION_SEED = 1000  # selection seeds 1000, 1001, ...: never among the held-out training seeds of the CLI
POOL_SEED = 4242  # the training pool's draws (part k: POOL_SEED + k), shared by every training seed of a run
CLASS_A = 0


class Truth:
    """The exact class-A distribution and everything measured against it (fixed seed, independent of training)."""

    def __init__(self, seed=12345):
        generator = torch.Generator().manual_seed(seed)
        self.mixture = fractal_mixture("A")
        self.outliers = OutlierRate(self.mixture.sample(REFERENCE_SIZE, generator),
                                    self.mixture.sample(HELD_OUT_SIZE, generator))
        self.logp_true = self.mixture.log_prob(self.mixture.sample(HELD_OUT_SIZE, generator)).numpy()
        self.pr_reference = self.mixture.sample(PR_SIZE, generator)

    def measure(self, samples):
        logp = self.mixture.log_prob(samples).numpy()
        precision, recall = precision_recall(self.pr_reference, samples[:PR_SIZE])
        return dict(outlier_rate=self.outliers(samples), logp_outlier_rate=logp_outlier_rate(logp, self.logp_true),
                    precision=precision, recall=recall, mean_logp=float(logp.mean()),
                    median_logp=float(np.median(logp)))


class CountedNetwork:
    """A network that counts the samples it evaluates: evaluations / samples drawn is the NFE per sample."""

    def __init__(self, network):
        self.network, self.evaluations = network, 0

    def __call__(self, x, t, y):
        self.evaluations += len(x)
        return self.network(x, t, y)


def method_denoiser(method, weights, main, guide, labels):
    """denoise(x, t) -> velocity of class `labels` for one method at its weights (a dict). Every network returns
    (final, intermediate); the guide has no intermediate head."""
    if method == "autoguidance":
        return lambda x, t: guidance.autoguidance(main(x, t, labels)[0], guide(x, t, labels)[0], weights["w"])
    return guidance.guided_denoiser(main, labels, main.network.null_label, **weights)


def sweep(config):
    """[(method, weights)] of the selection sweep, unguided first."""
    return ([("unguided", {})] + [("ig", dict(w_ig=w)) for w in config["ig_weights"]]
            + [("cfg", dict(w_cfg=w)) for w in config["cfg_weights"]]
            + [("ig+cfg", dict(w_ig=wi, w_cfg=wc)) for wi, wc in config["ig_cfg_weights"]]
            + [("autoguidance", dict(w=w)) for w in config["autoguidance_weights"]])


def sample(denoise, noise, config, model_dtype=torch.float32):
    grid = samplers.rho_grid(config["heun_steps"])
    return samplers.heun(denoise, noise, grid, model_dtype=model_dtype)


MAIN, GUIDE = dict(hidden=64, intermediate_layer=1), dict(hidden=32, intermediate_layer=None)  # the guide: no IG head


def worker_job(fn, *args):
    """fn(*args) on one thread, as a worker process runs its share. -> (fn's result, the CPU seconds it took)"""
    torch.set_num_threads(1)
    cpu = time.process_time()
    return fn(*args), time.process_time() - cpu


def pool_part(part, config, target):
    """One worker's share of the training pool, drawn with its own seed POOL_SEED + part."""
    size = config["pool_size"] // config["pool_parts"]
    return target_pool([fractal_mixture("A"), fractal_mixture("B")], size, POOL_SEED + part, target=target)


def train_pair(seed, config, parameterisation, pool):
    """Train one training seed's main model and guide from the shared pool; every draw, the initialisation included,
    is seeded, so the result does not depend on which process runs it. -> [main state, guide state]"""
    states = []
    for name, size, iterations, model_seed in (("main", MAIN, "main_iterations", seed),
                                               ("guide", GUIDE, "guide_iterations", seed + 1000)):
        torch.manual_seed(model_seed)
        model = ToyDenoiser(parameterisation=parameterisation, **size)
        states.append(train(model, pool, config[iterations], batch=config["batch"],
                            lr_decay_start=config["lr_decay_start"], seed=model_seed,
                            log=lambda line: print(line, flush=True), name=f"seed {seed} {name}").state_dict())
    return states


def trained_models(states, parameterisation):
    """The main model and guide of train_pair's states, in eval mode."""
    models = []
    for size, state in zip((MAIN, GUIDE), states):
        models.append(ToyDenoiser(parameterisation=parameterisation, **size))
        models[-1].load_state_dict(state)
    return models[0].eval(), models[1].eval()


def held_out_run(seed, states, runs, config, parameterisation, truth):
    """A held-out seed's methods at their chosen weights, from its own noise: measure_methods' (results, samples)."""
    return measure_methods(*trained_models(states, parameterisation), runs, noise_for(seed, config["samples"]),
                           config, truth)


def measure_methods(main, guide, runs, noise, config, truth):
    """Sample and score each (method, weights) of `runs` from the same noise. -> {(method, weights as tuple):
    metrics with the counted network evaluations per sample}, {same key: (N, 2) samples}"""
    labels = torch.full((len(noise),), CLASS_A, dtype=torch.long)
    results, samples = {}, {}
    for method, weights in runs:
        counted_main, counted_guide = CountedNetwork(main), CountedNetwork(guide)
        x = sample(method_denoiser(method, weights, counted_main, counted_guide, labels), noise, config)
        key = (method, tuple(weights.items()))
        nfe = (counted_main.evaluations + counted_guide.evaluations) / len(noise)
        results[key] = dict(truth.measure(x), network_evals_per_sample=nfe)
        samples[key] = x.float().numpy()
    return results, samples


def mean_over_seeds(per_seed):
    return {key: {m: float(np.mean([r[key][m] for r in per_seed])) for m in per_seed[0][key]} for key in per_seed[0]}


def choose_weights(table):
    """Per method, the weights with the lowest mean outlier rate among those keeping recall >= RECALL_FLOOR x unguided;
    a method with no such weight gets its highest-recall one (and says so through `meets_recall_floor`)."""
    floor = RECALL_FLOOR * table[("unguided", ())]["recall"]
    best = {}
    for method in dict.fromkeys(m for m, _ in table):
        candidates = {w: r for (m, w), r in table.items() if m == method}
        passing = {w: r for w, r in candidates.items() if r["recall"] >= floor}
        if passing:
            best[method] = min(passing, key=lambda w: passing[w]["outlier_rate"])
        else:
            best[method] = max(candidates, key=lambda w: candidates[w]["recall"])
    return best, floor


def reductions(per_seed, method):
    """Each held-out seed's relative outlier reduction of `method` against unguided (same seed, same noise)."""
    return [1 - r[method]["outlier_rate"] / r["unguided"]["outlier_rate"] for r in per_seed]


def check_claims(methods, per_seed):
    """The paper's claim, measured on the held-out seeds: IG lowers outliers comparably to autoguidance (at least
    80% of its mean reduction) on every seed, keeping diversity (recall >= RECALL_FLOOR x unguided)."""
    ig, autoguided = np.array(reductions(per_seed, "ig")), np.array(reductions(per_seed, "autoguidance"))
    return dict(ig_lowers_outliers_on_every_seed=bool((ig > 0).all()),
                ig_reduction_mean=float(ig.mean()), autoguidance_reduction_mean=float(autoguided.mean()),
                ig_comparable_to_autoguidance=bool(ig.mean() >= 0.8 * autoguided.mean()),
                ig_beats_autoguidance_on_seeds=int((ig > autoguided).sum()),
                ig_keeps_recall=bool(methods["ig"]["recall"] >= RECALL_FLOOR * methods["unguided"]["recall"]))


class Phases:
    """Wall and CPU seconds per phase of the run: the main process's own work (phases(name, fn, ...)) and the workers'
    (phases.wait(name, future): the wall time is the main process's wait, the CPU time the worker's)."""

    def __init__(self):
        self.seconds, self.start, self.worker_cpu_s = {}, time.time(), 0.0

    def _add(self, name, wall_s, cpu_s):
        spent = self.seconds.setdefault(name, dict(wall_s=0.0, cpu_s=0.0))
        spent["wall_s"] += wall_s
        spent["cpu_s"] += cpu_s

    def __call__(self, name, fn, *args):
        wall, cpu = time.time(), time.process_time()
        out = fn(*args)
        self._add(name, time.time() - wall, time.process_time() - cpu)
        return out

    def wait(self, name, future):
        """The result of a worker_job future."""
        wall = time.time()
        out, cpu = future.result()
        self._add(name, time.time() - wall, cpu)
        self.worker_cpu_s += cpu
        return out


def measure_held_out(seeds, states, runs, config, parameterisation, truth, workers, phases):
    """held_out_run for each seed: the first here while the workers train the others, which they then measure
    themselves. states(seed) waits for a seed's trained states. -> [(results, samples)] in seed order"""
    first, *others = seeds
    measured = [phases("held-out sampling", held_out_run, first, states(first), runs, config, parameterisation,
                       truth)]
    pending = [workers.submit(worker_job, held_out_run, seed, states(seed), runs, config, parameterisation, truth)
               for seed in others]
    return measured + [phases.wait("held-out sampling", future) for future in pending]


def noise_for(seed, n):
    """The initial noises of the samples drawn for training seed `seed`, apart from its training draws."""
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + 777), dtype=torch.float64)


def select(seeds, models, config, truth, phases, log):
    """Every method's sweep measured on the selection seeds' models (models(seed) -> main, guide) and noises; the mean
    over those seeds."""
    selection = []
    for seed in seeds:
        main_model, guide = models(seed)
        results, _ = phases("selection sampling", measure_methods, main_model, guide, sweep(config),
                            noise_for(seed, config["selection_samples"]), config, truth)
        selection.append(results)
        log(f"selection seed {seed}: " + ", ".join(f"{m}{dict(w)} {r['outlier_rate']:.4f}/{r['recall']:.3f}"
                                                   for (m, w), r in results.items()))
    return mean_over_seeds(selection)


def print_table(methods, claims):
    """The console table; a reduction prints as the change of the outlier rate, as the README writes it (-19.9%)."""
    print(f"\n{'method':<14}{'weights':<30}{'outliers':>10}{'precision':>10}{'recall':>8}{'NFE':>6}  "
          "reduction per seed")
    for method, m in methods.items():
        print(f"{method:<14}{json.dumps(m['weights']):<30}{m['outlier_rate']:>10.4f}{m['precision']:>10.3f}"
              f"{m['recall']:>8.3f}{m['network_evals_per_sample']:>6.0f}  "
              + " ".join(f"{0.0 - r:+.1%}" for r in m["outlier_reduction_per_seed"]))  # 0.0 - r: no "-0.0%"
    print("\nclaims: " + json.dumps(claims))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="first held-out training seed")
    parser.add_argument("--seeds", type=int, default=3, help="number of held-out training seeds")
    parser.add_argument("--config", choices=list(CONFIGS), default="full",
                        help="full: the default run; long: the Autoguidance toy's iteration counts (4096 and 512, at "
                             "batch 1024, 1.6x full's); quick: a smoke run")
    parser.add_argument("--quick", action="store_const", const="quick", dest="config", help="same as --config quick")
    parser.add_argument("--parameterisation", choices=list(HEADS), default="velocity",
                        help="energy: each head reads a log-density and returns its velocity (the Autoguidance toy's "
                             "model); velocity: each head is a linear map to the velocity (toy/model.py)")
    parser.add_argument("--target", choices=TARGETS, default="exact",
                        help="exact: regress the exact velocity of the noisy mixture (the Autoguidance toy's "
                             "training); noisy: the single-sample target eps - x0 (plain flow matching)")
    parser.add_argument("--workers", type=int, default=2,
                        help="processes training the models in parallel, one thread each")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.exit(2, "error: expected --workers >= 1\n")
    if args.seeds < 1 or args.seed < 0 or args.seed + args.seeds > SELECTION_SEED:
        parser.exit(2, f"error: expected --seeds >= 1 and held-out seeds within 0..{SELECTION_SEED - 1}\n")
    return args


def main(argv=None):
    """The command line: one thread in this process, which samples beside the two one-thread training workers (the
    caller's thread count is restored on return)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reproduce(args)
    finally:
        torch.set_num_threads(threads)


def reproduce(args):
    config = CONFIGS[args.config]
    try:
        out = writable_folder(args.out)
    except ValueError as error:
        exit_with_error(error)
    phases = Phases()
    log = lambda message: print(f"[{time.time() - phases.start:6.1f} s] {message}", flush=True)  # noqa: E731

    selection_seeds = [SELECTION_SEED + i for i in range(config["selection_seeds"])]
    held_out_seeds = list(range(args.seed, args.seed + args.seeds))
    log(f"{args.config} run: training a main model and a guide for each of the seeds {selection_seeds} (selection) "
        f"and {held_out_seeds} (held out) on {args.workers} worker process(es); meanwhile the ground truth")
    workers = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
    parts = [workers.submit(worker_job, pool_part, part, config, args.target) for part in range(config["pool_parts"])]
    truth = phases("truth", Truth)
    log("ground truth ready")
    parts = [phases.wait("target pool", part) for part in parts]  # concatenated in part order: any worker count
    pool = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    log(f"training pool ready: {len(pool['t']):,} points with their {args.target} targets")
    training = {seed: workers.submit(worker_job, train_pair, seed, config, args.parameterisation, pool)
                for seed in selection_seeds + held_out_seeds}  # selection seeds first: their sampling overlaps
    states = lambda seed: phases.wait("training", training[seed])  # noqa: E731
    # while the workers train: the exact denoiser's ceiling (on held-out seed 0's first noises), the figure's density
    noise = noise_for(held_out_seeds[0], config["samples"])[:config["exact_samples"]]
    exact_velocity = CountedNetwork(lambda x, t, y: truth.mixture.velocity(x, t))
    exact = phases("exact denoiser", sample, lambda x, t: exact_velocity(x, t, None), noise, config)
    figure_density = phases("figure", density_image, truth.mixture)

    selection_table = select(selection_seeds, lambda seed: trained_models(states(seed), args.parameterisation),
                             config, truth, phases, log)
    best, floor = choose_weights(selection_table)
    log("chosen weights: " + json.dumps({m: dict(w) for m, w in best.items()}))

    measured = measure_held_out(held_out_seeds, states, [(m, dict(w)) for m, w in best.items()], config,
                                args.parameterisation, truth, workers, phases)
    workers.shutdown()
    per_seed = [{m: results[(m, w)] for m, w in best.items()} for results, _ in measured]
    figure_samples = {m: measured[0][1][(m, w)] for m, w in best.items()}
    for seed, results in zip(held_out_seeds, per_seed):
        log(f"held-out seed {seed}: " + ", ".join(f"{m} {r['outlier_rate']:.4f}/{r['recall']:.3f}"
                                                  for m, r in results.items()))

    held_out = {m: {k: float(np.mean([r[m][k] for r in per_seed])) for k in per_seed[0][m]} for m in best}
    methods = {m: dict(held_out[m], weights=dict(best[m]), outlier_reduction_per_seed=reductions(per_seed, m),
                       meets_recall_floor_in_selection=selection_table[(m, best[m])]["recall"] >= floor)
               for m in best}
    methods["exact"] = dict(truth.measure(exact), network_evals_per_sample=exact_velocity.evaluations / len(noise),
                            weights={}, outlier_reduction_per_seed=[])
    claims = check_claims(methods, per_seed)
    metrics = dict(methods=methods, claims=claims, held_out_seeds=held_out_seeds, per_seed=per_seed,
                   selection=dict(seeds=selection_seeds, recall_floor=RECALL_FLOOR, samples=config["selection_samples"],
                                  sweep=[dict(method=m, weights=dict(w), **r)
                                         for (m, w), r in selection_table.items()]),
                   threshold_logp=float(np.quantile(truth.logp_true, 0.01)), outlier_distance=truth.outliers.threshold,
                   config=dict(config, name=args.config, parameterisation=args.parameterisation, target=args.target),
                   phases=phases.seconds, wall_time_s=time.time() - phases.start,
                   cpu_time_s=time.process_time() + phases.worker_cpu_s)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    np.savez(out / "samples.npz", exact=exact.float().numpy(), **figure_samples)
    draw_panels(figure_density, dict(truth=truth.pr_reference.numpy(), **figure_samples, exact=exact.numpy()),
                methods, out / "toy.png")

    print_table(methods, claims)
    print("phases: " + json.dumps({k: {n: round(v, 1) for n, v in s.items()} for k, s in phases.seconds.items()}))
    log(f"wrote {out}/metrics.json, samples.npz, toy.png")
    return metrics


if __name__ == "__main__":
    main()
