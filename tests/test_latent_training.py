"""Training on prepare.py's latent shards, LightningDiT + IG, the cosine term, IG's accelerated training, and configs
stored before these fields: stored moments give a fresh posterior sample per step, each sample's first draw from its
own stream-position seed (exact, and its mean and variance over many draws); stored samples are normalised by
latents_stats.pt (exact); folders that do not fit the config are refused in one line; prepare.py's own shards train;
a tiny LightningDiT trains on f16d32-like shards with the preset's AdamW beta2 and resumes bitwise; the cosine term
against a direct computation, on the final head only; ig_omega's loss against its formula, its gradient against the
plain objective's, the trainer's EMA in its step and a bitwise resume; the logit-normal t against its law and in the
run's loss; an old config without the new fields resumes and loads."""
import json

import numpy as np
import pytest
import torch
from scipy import stats
from PIL import Image

import prepare
import train
from ref import internal_guidance, runtime
from ref.checkpoints import read_checkpoint
from ref.configs import ADDED_DIT_FIELDS, ADDED_FIELDS, CONFIGS
from ref.data import batch_indices
from ref.dit import count_parameters
from ref.internal_guidance import DiTRun, dit_from_config
from ref.latents import STATS_FILE, TrainingLatents
from ref.lightningdit import MODELS as LIGHTNINGDIT_MODELS
from ref.losses import cosine_distance, ddpm_timesteps, flow_matching_loss, flow_timesteps
from ref.runtime import SampleDraws, stream_seed
from ref.safetensors import save_file
from ref.trainer import learning_rate
from ref.vae import MODELS as VAES
from shapes.runs import ShapesDiTRun
from tests.helpers import assert_same_state, train_error

torch.set_num_threads(1)
SD_SCALE = 0.18215
# A 2-block, 32-wide network with the IG head after block 1 on 32 px images, 4 samples a step.
SMALL = ["--image-size", "32", "--num-classes", "10", "--depth", "2", "--hidden-size", "32", "--num-heads", "4",
         "--intermediate-block", "1", "--batch-size", "4", "--log-every", "1", "--workers", "0"]
LIGHTNINGDIT = ["--config", "lightningdit-xl1-imagenet", *SMALL]
SIT = ["--config", "sit-b2-imagenet", *SMALL]
SHAPES = ["--config", "shapes-tiny", "--depth", "2", "--hidden-size", "32", "--batch-size", "4", "--log-every", "1"]


def write_shards(root, stored, labels, settings=None, stats=None):
    """Two shards of `stored` (N, C, h, w) float32 and labels (N,), prepare.json `settings` and the statistics file
    when given."""
    root.mkdir(parents=True, exist_ok=True)
    half = len(stored) // 2
    for shard, part in enumerate((slice(0, half), slice(half, None))):
        np.save(root / f"latents_{shard:05d}.npy", stored[part].astype(np.float32))
        np.save(root / f"labels_{shard:05d}.npy", labels[part].astype(np.int64))
    if settings is not None:
        (root / "prepare.json").write_text(json.dumps(settings))
    if stats is not None:
        torch.save({name: torch.from_numpy(value.reshape(1, -1, 1, 1)) for name, value in stats.items()},
                   root / STATS_FILE)
    return root


def random_moments(rng, n, channels, side):
    """(N, 2C, h, w): means in [-2, 2], logvars in [-3, 1]."""
    return np.concatenate([rng.uniform(-2, 2, (n, channels, side, side)),
                           rng.uniform(-3, 1, (n, channels, side, side))], axis=1).astype(np.float32)


def expected_draw(moments, seed, scale):
    """(mean + exp(logvar / 2) * the first standard normals of a generator seeded `seed`) * scale, in float32."""
    mean, logvar = torch.from_numpy(moments).chunk(2)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    return (mean + torch.exp(logvar / 2) * noise) * scale


def vavae_shards(root, rng, n=8):
    """Posterior samples of an f16d32-like VAE for 32 px images, (N, 32, 2, 2), and their statistics file."""
    stored = rng.normal(3.0, 2.0, (n, 32, 2, 2)).astype(np.float32)
    stats = dict(mean=rng.normal(0, 1, 32).astype(np.float32), std=rng.uniform(0.5, 2, 32).astype(np.float32))
    return write_shards(root, stored, rng.integers(0, 10, n), dict(vae_kind="vavae-f16d32", store="sample"), stats)


# ---------------------------------------------------------------------------------------------------------------------
# What a shard stores -> the network's input
# ---------------------------------------------------------------------------------------------------------------------

def test_moments_give_each_sample_a_posterior_draw_from_its_own_seed(tmp_path):
    rng = np.random.default_rng(0)
    moments = random_moments(rng, 4, 4, 2)
    root = write_shards(tmp_path, moments, np.arange(4), dict(vae_kind="sd", store="moments"))
    latents = TrainingLatents(root, "sd", (4, 2, 2))
    assert len(latents.dataset) == 4 and torch.equal(latents.dataset[3][0], torch.from_numpy(moments[3]))
    x0 = latents.network_input(torch.from_numpy(moments[[0, 2, 3]]), SampleDraws([7, 8, 9]))
    for row, (item, seed) in enumerate(((0, 7), (2, 8), (3, 9))):
        assert torch.equal(x0[row], expected_draw(moments[item], seed, SD_SCALE))
    # The same item and seed in another batch: the same latent, whatever its neighbours.
    other = latents.network_input(torch.from_numpy(moments[[1, 2]]), SampleDraws([5, 8]))
    assert torch.equal(other[1], x0[1]) and not torch.equal(other[0], x0[0])


def test_moment_draws_have_the_posterior_mean_and_variance(tmp_path):
    rng = np.random.default_rng(1)
    moments = random_moments(rng, 2, 4, 2)
    latents = TrainingLatents(write_shards(tmp_path, moments, np.arange(2), dict(vae_kind="sd", store="moments")),
                              "sd", (4, 2, 2))
    draws = 4000
    z = latents.network_input(torch.from_numpy(moments[[1] * draws]), SampleDraws(range(draws))).double() / SD_SCALE
    mean, variance = torch.from_numpy(moments[1, :4]).double(), torch.from_numpy(moments[1, 4:]).double().exp()
    # 16 elements, each within 4.5 standard errors (mean: sqrt(var / n); variance: var sqrt(2 / n) for a normal)
    assert ((z.mean(0) - mean).abs() < 4.5 * (variance / draws).sqrt()).all()
    assert ((z.var(0) - variance).abs() < 4.5 * variance * (2 / draws) ** 0.5).all()


def test_samples_are_normalised_by_the_statistics_file(tmp_path):
    rng = np.random.default_rng(2)
    root = vavae_shards(tmp_path, rng)
    latents = TrainingLatents(root, "vavae-f16d32", (32, 2, 2))
    stored = np.concatenate([np.load(root / "latents_00000.npy"), np.load(root / "latents_00001.npy")])
    stats = torch.load(root / STATS_FILE, weights_only=True)
    batch = torch.stack([latents.dataset[i][0] for i in (5, 1)])
    expected = (stored[[5, 1]] - stats["mean"].numpy()) / stats["std"].numpy()  # float32 in numpy
    assert torch.equal(latents.network_input(batch, SampleDraws([0, 1])), torch.from_numpy(expected))


def test_plain_latents_without_prepare_json_are_scaled(tmp_path):
    stored = np.random.default_rng(3).normal(size=(4, 4, 2, 2)).astype(np.float32)
    latents = TrainingLatents(write_shards(tmp_path, stored, np.arange(4)), "sd", (4, 2, 2))
    assert torch.equal(latents.dataset[2][0], torch.from_numpy(stored[2]) * SD_SCALE)
    assert torch.equal(latents.network_input(latents.dataset[2][0][None], SampleDraws([0]))[0],
                       latents.dataset[2][0])


def make_misfit(case, root):
    """A shard folder that does not fit the LightningDiT preset at 32 px -> (flags, text the message must hold)."""
    rng = np.random.default_rng(4)
    if case == "missing statistics":
        (vavae_shards(root, rng) / STATS_FILE).unlink()
        return [], [f"{root / STATS_FILE}: no such file", "prepare.py latents --vae-kind vavae-f16d32"]
    if case == "another VAE":
        write_shards(root, random_moments(rng, 4, 4, 2), np.arange(4), dict(vae_kind="sd", store="moments"))
        return [], ["encoded by the 'sd' VAE, the run expects 'vavae-f16d32'; set --vae sd"]
    if case == "moments with the sample's channels":
        write_shards(root, random_moments(rng, 4, 2, 2), np.arange(4), dict(vae_kind="sd", store="moments"))
        return ["--vae", "sd", "--image-size", "16"], ["latents_00000.npy: expected shape (N, 8, 2, 2)",
                                                       "got (2, 4, 2, 2)", "the sd VAE's moments"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing statistics", "another VAE", "moments with the sample's channels"])
def test_a_shard_folder_that_does_not_fit_is_one_error_line(case, tmp_path, capsys):
    flags, parts = make_misfit(case, tmp_path / "shards")
    error = train_error([*LIGHTNINGDIT, "--data-path", tmp_path / "shards", *flags, "--out", tmp_path / "run"],
                        capsys)
    assert error.startswith("error: ") and error.count("\n") == 1 and all(part in error for part in parts), error
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Training on the shards
# ---------------------------------------------------------------------------------------------------------------------

def recorded_inputs(monkeypatch):
    """Record the x0 the flow loss gets at every training step (the FLOP count's meta call left out)."""
    seen, real_loss = [], internal_guidance.flow_matching_loss

    def recording_loss(model, x0, *rest):
        if x0.device.type != "meta":
            seen.append(x0.clone())
        return real_loss(model, x0, *rest)
    monkeypatch.setattr(internal_guidance, "flow_matching_loss", recording_loss)
    return seen


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """prepare.py's shards of 6 random 32 px images in 2 classes with a tiny VAE: moments and samples."""
    root = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(5)
    for name in ("cat", "dog"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / name / f"{i}.png")
    torch.manual_seed(0)
    save_file(VAES["tiny"]().state_dict(), root / "tiny.safetensors")
    for store in ("moments", "sample"):
        prepare.main(["latents", "--data-path", str(root / "images"), "--vae", str(root / "tiny.safetensors"),
                      "--vae-kind", "tiny", "--image-size", "32", "--out", str(root / store), "--store", store,
                      "--no-flip", "--shard-size", "4", "--workers", "0"])
    return root


def stored_items(root):
    return np.concatenate([np.load(path) for path in sorted(root.glob("latents_*.npy"))])


@pytest.mark.parametrize("store", ["moments", "sample"])
def test_prepared_shards_train_on_their_latents(store, prepared, tmp_path, monkeypatch):
    """Each step's x0: of moments, the posterior draw from the seed of the sample's stream position (its first draw);
    of samples, the normalised latents."""
    seen = recorded_inputs(monkeypatch)
    train.main([*SIT, "--vae", "tiny", "--data-path", str(prepared / store), "--steps", "2",
                "--out", str(tmp_path / "run")])
    stored, seed = stored_items(prepared / store), CONFIGS["sit-b2-imagenet"]["seed"]
    stats = torch.load(prepared / store / STATS_FILE, weights_only=True) if store == "sample" else None
    assert len(seen) == 2 and seen[0].shape == (4, 4, 8, 8)
    for step, x0 in enumerate(seen):
        for row, item in enumerate(batch_indices(step, 4, 0, 1, seed, len(stored))):
            if store == "moments":
                expected = expected_draw(stored[item], stream_seed(seed, 4 * step + row), 1.0)  # tiny: scale 1
            else:
                expected = (torch.from_numpy(stored[item]) - stats["mean"][0]) / stats["std"][0]
            assert torch.equal(x0[row], expected)


def test_lightningdit_trains_on_f16d32_shards_and_resumes_bitwise(tmp_path):
    """The LightningDiT preset cut to 2 blocks of width 32: its network, AdamW beta2 0.95 (and a --weight-decay) in the
    optimizer, the cosine term on; stopped after step 2 and rerun, bitwise the uninterrupted run."""
    root = vavae_shards(tmp_path / "shards", np.random.default_rng(6))
    flags = [*LIGHTNINGDIT, "--data-path", str(root), "--steps", "4", "--checkpoint-every", "2", "--weight-decay",
             "0.01"]
    train.main([*flags, "--out", str(tmp_path / "whole")])
    train.main([*flags, "--out", str(tmp_path / "split"), "--stop-after", "2"])
    train.main([*flags, "--out", str(tmp_path / "split")])
    whole, split = (read_checkpoint(tmp_path / name / "latest.pt") for name in ("whole", "split"))
    for part in ("model", "ema", "opt"):
        assert_same_state(split[part], whole[part])
    assert whole["step"] == 4 and whole["model"]["x_embedder.proj.weight"].shape == (32, 32, 1, 1)
    assert "feat_rope.freqs_cos" in whole["model"] and "blocks.1.mlp.w12.weight" in whole["model"]
    assert [(group["betas"], group["weight_decay"]) for group in whole["opt"]["param_groups"]] == [((0.9, 0.95), 0.01)]
    assert whole["args"]["cosine_loss"] and whole["args"]["arch"] == "lightningdit"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and np.all(np.isfinite(losses))


def test_the_lightningdit_preset_is_the_release_model():
    config = CONFIGS["lightningdit-xl1-imagenet"]
    with torch.device("meta"):
        ours = DiTRun(config).build()
        theirs = LIGHTNINGDIT_MODELS["LightningDiT-XL/1"](intermediate_block=8)
    assert {key: value.shape for key, value in ours.state_dict().items()} == \
        {key: value.shape for key, value in theirs.state_dict().items()}
    assert count_parameters(ours) == 677_951_296  # the IG notes' count of the release's model with its head
    assert (config["lr"], config["adam_beta2"], config["batch_size"], config["grad_clip"], config["ema_decay"],
            config["label_dropout"], config["steps"]) == (2e-4, 0.95, 256, 1.0, 0.9999, 0.1, 3_000_000)


# ---------------------------------------------------------------------------------------------------------------------
# The cosine term
# ---------------------------------------------------------------------------------------------------------------------

def direct_cosine_distance(prediction, target):
    """1 - cos over the channels at each position, averaged over the positions, in float64 loops. -> (N,)"""
    p, q = prediction.double().numpy(), target.double().numpy()
    n, _, height, width = p.shape
    return np.array([np.mean([1 - p[i, :, h, w] @ q[i, :, h, w] / np.linalg.norm(p[i, :, h, w])
                              / np.linalg.norm(q[i, :, h, w]) for h in range(height) for w in range(width)])
                     for i in range(n)])


def test_cosine_distance_against_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 3, 5, 3, 2, generator=generator)
    np.testing.assert_allclose(cosine_distance(prediction, target).numpy(),
                               direct_cosine_distance(prediction, target), rtol=1e-5, atol=1e-6)
    assert torch.allclose(cosine_distance(target, target), torch.zeros(3), atol=1e-6)
    assert torch.allclose(cosine_distance(-target, target), torch.full((3,), 2.0))


def test_the_cosine_term_is_added_for_the_final_head_only():
    generator = torch.Generator().manual_seed(1)
    x0, eps, final, intermediate = torch.randn(4, 2, 3, 2, 2, generator=generator)
    t = torch.tensor([0.3, 0.8])

    def model(x_t, t, y):
        return final, intermediate
    with_term, without = (flow_matching_loss(model, x0, t, None, eps, 0.5, cosine) for cosine in (True, False))
    np.testing.assert_allclose((with_term - without).numpy(), direct_cosine_distance(final, eps - x0), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# IG's accelerated training (ig_omega)
# ---------------------------------------------------------------------------------------------------------------------

def pixel_run(**changes):
    """A DiTRun of a 2-block DiT with the IG head after block 1 on 8 px RGB inputs, no label dropout."""
    return DiTRun(dict(CONFIGS["sit-b2-imagenet"], data="images", image_size=8, num_classes=3, depth=2,
                       hidden_size=32, num_heads=4, patch_size=2, intermediate_block=1, label_dropout=0.0,
                       **changes))


def test_ig_omega_loss_is_the_formula_and_changes_only_the_final_heads_gradient():
    torch.manual_seed(0)
    run = pixel_run(ig_omega=0.5)
    net, ema = run.build(), run.build()  # the EMA: other weights, so D_f^EMA - D_i^EMA is not D_f - D_i
    for module in (net, ema):  # non-zero heads and gates (DiT's init zeroes them)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    run.use_ema(ema.requires_grad_(False))
    x0, y, seeds = torch.randn(2, 3, 8, 8), torch.tensor([0, 2]), [11, 12]
    loss = run.loss(net, (x0, y), SampleDraws(seeds), torch.device("cpu"))
    # The step's draws for each sample: label dropout (one uniform), t, then the noise.
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    for generator in generators:
        torch.rand(1, generator=generator)  # label dropout's uniform
    t = torch.stack([torch.rand((), generator=generator) for generator in generators])
    eps = torch.stack([torch.randn(3, 8, 8, generator=generator) for generator in generators])
    x_t, v = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps, eps - x0
    with torch.no_grad():
        final, intermediate = net(x_t, t, y)
        ema_final, ema_intermediate = ema(x_t, t, y)
    expected = ((final - v - 0.5 * (ema_final - ema_intermediate)) ** 2).mean((1, 2, 3)) \
        + 0.5 * ((intermediate - v) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    gradients = []
    for omega_run in (run, pixel_run()):
        net.zero_grad()
        omega_run.loss(net, (x0, y), SampleDraws(seeds), torch.device("cpu")).sum().backward()
        gradients.append({name: parameter.grad.clone() for name, parameter in net.named_parameters()
                          if parameter.requires_grad})
    accelerated, plain = gradients
    assert not torch.allclose(accelerated["final_layer.linear.weight"], plain["final_layer.linear.weight"])
    assert torch.equal(accelerated["intermediate_head.linear.weight"], plain["intermediate_head.linear.weight"])


@pytest.mark.parametrize("flags, message", [(["--intermediate-block", "none"], "needs the IG head"),
                                            (["--objective", "eps"], "--ig-omega is an option of the flow objective")])
def test_ig_omega_is_refused_without_the_head_or_with_eps(flags, message, tmp_path, capsys):
    error = train_error([*SHAPES, "--ig-omega", "0.5", *flags, "--out", tmp_path / "run"], capsys)
    assert error.startswith("error: ") and message in error
    assert not (tmp_path / "run").exists()


def test_ig_omega_steps_read_the_trainers_ema_and_resume_bitwise(tmp_path, monkeypatch):
    ema_models, real_loss = [], internal_guidance.accelerated_flow_matching_loss

    def recording_loss(model, ema_model, *rest):
        ema_models.append(ema_model)
        return real_loss(model, ema_model, *rest)
    monkeypatch.setattr(internal_guidance, "accelerated_flow_matching_loss", recording_loss)
    flags = [*SHAPES, "--ig-omega", "0.5", "--ema-decay", "0.5", "--steps", "3", "--checkpoint-every", "1"]
    train.main([*flags, "--out", str(tmp_path / "whole")])
    whole = read_checkpoint(tmp_path / "whole" / "latest.pt")
    trained_ema = ema_models[-1]  # the FLOP count's meta EMA first, then the run's, the same module at every step
    assert len(ema_models) == 4 and all(ema_model is trained_ema for ema_model in ema_models[1:])
    assert_same_state(trained_ema.state_dict(), whole["ema"])
    train.main([*flags, "--out", str(tmp_path / "split"), "--stop-after", "1"])
    train.main([*flags, "--out", str(tmp_path / "split")])
    assert_same_state(read_checkpoint(tmp_path / "split" / "latest.pt")["model"], whole["model"])
    train.main([*SHAPES, "--ema-decay", "0.5", "--steps", "3", "--out", str(tmp_path / "plain")])
    plain = read_checkpoint(tmp_path / "plain" / "latest.pt")["model"]
    assert not torch.equal(plain["final_layer.linear.weight"], whole["model"]["final_layer.linear.weight"])


def test_lr_decay_cools_a_finished_run_down(tmp_path, capsys):
    """--lr-decay-steps: the last N steps' lr falls linearly (closed form); a run trained at a constant lr and then
    resumed with more --steps and the decay ends bitwise where one run with those settings ends, and elsewhere than
    the same steps at a constant lr. A run whose decay had begun, given more --steps, is said to differ from one run
    with them (and does)."""
    config = dict(lr=1e-3, steps=10, lr_decay_steps=4)
    assert [learning_rate(config, step) for step in range(5, 10)] == pytest.approx([1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert learning_rate(dict(config, lr_decay_steps=0), 9) == 1e-3
    flags = [*SHAPES, "--checkpoint-every", "2"]
    train.main([*flags, "--steps", "4", "--lr-decay-steps", "2", "--out", str(tmp_path / "whole")])
    train.main([*flags, "--steps", "4", "--out", str(tmp_path / "constant")])
    train.main([*flags, "--steps", "2", "--out", str(tmp_path / "cooled")])
    train.main([*flags, "--steps", "4", "--lr-decay-steps", "2", "--out", str(tmp_path / "cooled")])
    whole, constant, cooled = (read_checkpoint(tmp_path / name / "latest.pt")["model"]
                               for name in ("whole", "constant", "cooled"))
    assert_same_state(cooled, whole)
    assert any(not torch.equal(whole[name], constant[name]) for name in whole)
    assert "warning" not in capsys.readouterr().err
    train.main([*flags, "--steps", "2", "--lr-decay-steps", "2", "--out", str(tmp_path / "extended")])
    train.main([*flags, "--steps", "4", "--lr-decay-steps", "2", "--out", str(tmp_path / "extended")])
    assert "one run with --steps 4 --lr-decay-steps 2 has another lr from step 1 on" in capsys.readouterr().err
    extended = read_checkpoint(tmp_path / "extended" / "latest.pt")["model"]
    assert any(not torch.equal(whole[name], extended[name]) for name in whole)


# ---------------------------------------------------------------------------------------------------------------------
# The flow objective's t distribution
# ---------------------------------------------------------------------------------------------------------------------

def test_logit_normal_t_is_the_sigmoid_of_a_normal_at_its_location_and_uniform_stays_uniform():
    logit_normal = flow_timesteps(SampleDraws(range(3000)), "logit-normal").double()
    uniform = flow_timesteps(SampleDraws(range(3000)), "uniform").double()
    assert stats.kstest(torch.logit(logit_normal).numpy(), "norm").pvalue > 1e-3
    assert stats.kstest(uniform.numpy(), "uniform").pvalue > 1e-3
    assert stats.kstest(logit_normal.numpy(), "uniform").pvalue < 1e-6  # the law differs from U(0, 1)
    middle = ((logit_normal > 0.25) & (logit_normal < 0.75)).double().mean()  # P(|n| < logit 0.75) = 0.7275
    assert abs(middle - 0.7275) < 0.03
    shifted = flow_timesteps(SampleDraws(range(3000)), "logit-normal", 0.5).double()
    assert stats.kstest(torch.logit(shifted).numpy(), "norm", args=(0.5,)).pvalue > 1e-3
    assert stats.kstest(torch.logit(shifted).numpy(), "norm").pvalue < 1e-6
    assert abs((shifted > 0.5).double().mean() - stats.norm.cdf(0.5)) < 0.03  # P(n > 0) for n ~ N(0.5, 1): 0.6915


def test_the_eps_objectives_logit_normal_t_bins_the_flow_draw_onto_the_ddpm_steps():
    """uniform: U{0..T-1}, the draw DDPM always made (bitwise the same t); logit-normal: min(floor(T u), T - 1) of the
    flow objective's own u, so P(t <= k) = Phi(logit((k + 1) / T)) (checked at five steps on 4,000 draws)."""
    seeds, steps = range(4000), 1000
    torch.testing.assert_close(ddpm_timesteps(SampleDraws(seeds), steps), SampleDraws(seeds).randint(steps),
                               rtol=0, atol=0)
    t = ddpm_timesteps(SampleDraws(seeds), steps, "logit-normal", 0.5)
    u = flow_timesteps(SampleDraws(seeds), "logit-normal", 0.5)
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= steps - 1
    assert torch.equal(t, (u * steps).floor().long().clamp(max=steps - 1))
    for k in (49, 249, 499, 749, 949):
        expected = stats.norm.cdf(np.log((k + 1) / (steps - k - 1)) - 0.5)  # Phi(logit((k + 1) / T) - m)
        assert abs((t <= k).double().mean().item() - expected) < 0.025


def test_the_runs_t_distribution_is_the_one_its_flow_loss_sees(monkeypatch):
    seen = []
    monkeypatch.setattr(internal_guidance, "flow_matching_loss", lambda model, x0, t, *rest: seen.append(t) or t)
    x0, y, seeds = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2]), [5, 6, 7]
    for distribution, location in (("uniform", 0.0), ("logit-normal", 0.0), ("logit-normal", -0.7)):
        run = pixel_run(t_distribution=distribution, t_location=location)
        run.loss(None, (x0, y), SampleDraws(seeds), torch.device("cpu"))
    expected = []
    for draw in (lambda g: torch.rand((), generator=g), lambda g: torch.sigmoid(torch.randn((), generator=g)),
                 lambda g: torch.sigmoid(torch.randn((), generator=g) - 0.7)):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        for generator in generators:  # each sample's label dropout draws its uniform first
            torch.rand((1,), generator=generator)
        expected.append(torch.stack([draw(generator) for generator in generators]))
    torch.testing.assert_close(seen, expected, rtol=0, atol=0)


def test_the_eps_objectives_t_is_the_binned_draw_its_loss_sees(monkeypatch):
    """A DiT run with the eps objective hands its DDPM loss the t of ddpm_timesteps at its distribution, drawn after
    the label dropout."""
    seen = []
    monkeypatch.setattr(internal_guidance, "ddpm_eps_loss", lambda model, schedule, x0, t, *rest: seen.append(t) or t)
    x0, y, seeds = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2]), [5, 6, 7]
    for distribution in ("uniform", "logit-normal"):
        run = pixel_run(objective="eps", t_distribution=distribution)
        run.loss(None, (x0, y), SampleDraws(seeds), torch.device("cpu"))
        draws = SampleDraws(seeds)
        draws.rand(1)  # each sample's label dropout draws its uniform first
        torch.testing.assert_close(seen[-1], ddpm_timesteps(draws, 1000, distribution), rtol=0, atol=0)
    assert not torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("flags, message", [(["--t-distribution", "normal"], "unknown --t-distribution 'normal'"),
                                            (["--t-location", "0.5"], "--t-location is the logit-normal's m"),
                                            (["--objective", "eps", "--t-location", "0.5"],
                                             "--t-location is the logit-normal's m")])
def test_a_t_distribution_that_cannot_be_drawn_is_refused(flags, message, tmp_path, capsys):
    error = train_error([*SHAPES, *flags, "--out", tmp_path / "run"], capsys)
    assert error.startswith("error: ") and message in error
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Configs stored before the new fields
# ---------------------------------------------------------------------------------------------------------------------

def test_a_config_stored_without_the_new_fields_resumes_and_loads(tmp_path):
    flags = [*SHAPES, "--steps", "4", "--checkpoint-every", "2"]
    train.main([*flags, "--out", str(tmp_path / "whole")])
    train.main([*flags, "--out", str(tmp_path / "old"), "--stop-after", "2"])
    checkpoint = read_checkpoint(tmp_path / "old" / "latest.pt")
    for name in [*ADDED_FIELDS, *ADDED_DIT_FIELDS, *ShapesDiTRun.added_fields]:
        del checkpoint["args"][name]
    del checkpoint["digests"]  # a checkpoint that old stored no digests either
    torch.save(checkpoint, tmp_path / "old" / "latest.pt")
    network, config = runtime.load_trained_network(tmp_path / "old" / "latest.pt", "dit", dit_from_config)
    assert (config["arch"], config["vae"], config["adam_beta2"], config["ig_omega"]) == ("dit", "sd", 0.999, 0.0)
    assert_same_state(network.state_dict(), checkpoint["ema"])
    train.main([*flags, "--out", str(tmp_path / "old")])
    assert_same_state(read_checkpoint(tmp_path / "old" / "latest.pt")["model"],
                      read_checkpoint(tmp_path / "whole" / "latest.pt")["model"])
