"""sample.py: the same samples whatever the batch size and the number of ranks, sample i drawn from seed + i, the
output files, guidance flags and intervals reaching the network (against the formulas, on a network whose outputs are
known), the real network-evaluation count, eps and latent models, foreign checkpoints (official DiT and SiT against
re-derivations of their own samplers, the IG release's head block), and bad input (exit 2, a message, nothing
written)."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from ref import runtime
from ref.data import SD_VAE_SCALE_FACTOR, to_uint8
from ref.dit import MODELS
from ref.internal_guidance import dit_from_config
from ref.lightningdit import MODELS as LIGHTNINGDIT_MODELS
from ref.vae import MODELS as VAE_MODELS
from shapes.runs import SHAPES_CONFIGS

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
TINY = dict(SHAPES_CONFIGS["shapes-tiny"], depth=2, hidden_size=32, num_heads=4, config="shapes-tiny")
GUIDED = ["--steps", "8", "--ig", "1.5", "--ig-interval", "0.3", "1", "--cfg", "1.5", "--cfg-interval", "0", "0.7"]


def randomise(model, seed=0, scale=0.05):
    """Random weights everywhere: the zero init would make every sample its initial noise, and both heads equal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return model


def make_run(folder, **overrides):
    """A run folder whose latest.pt holds a random tiny model (as train.py writes it)."""
    config = dict(TINY, **overrides)
    model = randomise(dit_from_config(config))
    folder.mkdir(parents=True)
    optimizer = torch.optim.AdamW(model.parameters())
    runtime.save_checkpoint(folder / "latest.pt", model, model, optimizer, 0, config)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny")


def sample_images(run_folder, out, *flags):
    sample.main([str(run_folder), "--out", str(out), *map(str, flags)])
    with np.load(out / "samples.npz") as samples:
        return samples["arr_0"], samples["arr_1"]


def assert_same_images(a, b):
    """Equal, up to a rare one-level step: CPU matmul kernels round differently for different row counts (a batch of 1
    against one of 7), about 1e-7 relative, which can carry a value across a rounding boundary of the uint8 map."""
    assert a.shape == b.shape
    difference = np.abs(a.astype(int) - b.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def test_samples_do_not_depend_on_batch_size_or_ranks(run, tmp_path):
    one_by_one, labels = sample_images(run, tmp_path / "b1", "--num-samples", 7, "--batch-size", 1, *GUIDED)
    together, labels_together = sample_images(run, tmp_path / "b7", "--num-samples", 7, "--batch-size", 7, *GUIDED)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "sample.py", str(run), "--out", str(tmp_path / "r2"), "--num-samples", "7",
                             "--batch-size", "2", *GUIDED], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "r2" / "samples.npz") as two_ranks:
        assert_same_images(two_ranks["arr_0"], one_by_one)
        assert np.array_equal(two_ranks["arr_1"], labels)
    assert_same_images(together, one_by_one)
    assert np.array_equal(labels, np.arange(7) % 5) and np.array_equal(labels_together, labels)
    assert one_by_one.std() > 20 and len({image.tobytes() for image in one_by_one}) == 7  # real, distinct images


def test_sample_i_is_drawn_from_seed_plus_i(run, tmp_path):
    from_seed_0, _ = sample_images(run, tmp_path / "s0", "--num-samples", 3, "--seed", 0, "--class-label", 2, *GUIDED)
    from_seed_1, _ = sample_images(run, tmp_path / "s1", "--num-samples", 2, "--seed", 1, "--class-label", 2, *GUIDED)
    assert_same_images(from_seed_1, from_seed_0[1:])
    assert np.abs(from_seed_0[0].astype(int) - from_seed_0[1]).mean() > 10


def test_output_files(run, tmp_path):
    images, labels = sample_images(run, tmp_path, "--num-samples", 7, "--grid-rows", 8, *GUIDED)
    assert images.dtype == np.uint8 and images.shape == (7, 32, 32, 3) and labels.shape == (7,)
    with Image.open(tmp_path / "grid.png") as grid:  # 5 columns (one per class), 2 rows, the last padded
        assert grid.size == (5 * 32, 2 * 32)
        assert np.array_equal(np.asarray(grid)[32:64, 32:64], images[6])
    settings = json.loads((tmp_path / "settings.json").read_text())
    # 8 steps at t_i = 1 - 0.96 i / 7; those of i >= 3 (t <= 0.589) lie in the CFG interval [0, 0.7]: 8 + 5 evaluations
    assert settings["sampler"] == "em" and settings["steps"] == 8 and settings["network_evaluations_per_sample"] == 13
    assert settings["ig_interval"] == [0.3, 1.0] and settings["config"]["depth"] == 2 and settings["step"] == 0


def test_guidance_weights_and_intervals_reach_the_network(run, tmp_path):
    heun = ["--num-samples", 2, "--sampler", "heun", "--steps", 3]
    unguided, _ = sample_images(run, tmp_path / "plain", *heun)
    for flag in ("--ig", "--cfg"):
        guided, _ = sample_images(run, tmp_path / flag, *heun, flag, 3)
        outside, _ = sample_images(run, tmp_path / (flag + "-outside"), *heun, flag, 3, flag + "-interval", 0.4, 0.6)
        assert (guided != unguided).mean() > 0.2  # most pixels move (the random heads differ little)
        assert_same_images(outside, unguided)  # an interval that holds no t of the grid (1, 2/3, 1/3): no guidance


def test_eps_model_ddim_and_ddpm_and_the_ddpm_interval_scaling(tmp_path):
    run = make_run(tmp_path / "eps", objective="eps")
    ddim, _ = sample_images(run, tmp_path / "ddim", "--num-samples", 2, "--sampler", "ddim", "--steps", 4,
                            "--ig", 2, "--ig-interval", 0.3, 1)
    ddpm, _ = sample_images(run, tmp_path / "ddpm", "--num-samples", 1)  # the default: all 1000 steps
    assert ddim.shape == (2, 32, 32, 3) and ddpm.shape == (1, 32, 32, 3)
    assert json.loads((tmp_path / "ddpm" / "settings.json").read_text())["network_evaluations_per_sample"] == 1000
    # respaced to 10 steps: timesteps round(111 i) = 0, 111, ..., 999; t = timestep / 1000 in [0, 0.5] for the five
    # of 0..444, so CFG adds 5 evaluations (an unscaled interval would hold timestep 0 only: 11)
    sample_images(run, tmp_path / "half", "--num-samples", 1, "--steps", 10, "--cfg", 2, "--cfg-interval", 0, 0.5)
    assert json.loads((tmp_path / "half" / "settings.json").read_text())["network_evaluations_per_sample"] == 15


def tiny_vae_file(path, seed=3):
    """A random "tiny" VAE (4 latent channels, f4) as a state-dict file. -> (path, the VAE)"""
    vae = randomise(VAE_MODELS["tiny"](), seed=seed, scale=0.1).eval()
    torch.save(vae.state_dict(), path)
    return path, vae


def test_latent_model_writes_latents_or_decodes_them_with_the_vae(tmp_path, capsys):
    """Without --vae: latents.npy, the model's latents / the sd scaling factor (a config without `vae`). With a tiny
    VAE: samples.npz holds exactly those latents decoded (re-decoded here), for batch size 1 as for 3, and the PNGs
    hold the same images."""
    run = make_run(tmp_path / "latent", data="latents", patch_size=2)  # 32 px images: (4, 4, 4) latents
    flags = ["--num-samples", "3", "--steps", "4", "--cfg", "1.5"]
    sample.main([str(run), *flags, "--out", str(tmp_path / "latents")])
    assert "--vae PATH decodes them" in capsys.readouterr().out
    latents = np.load(tmp_path / "latents" / "latents.npy")
    assert latents.shape == (3, 4, 4, 4) and latents.dtype == np.float32
    assert np.array_equal(np.load(tmp_path / "latents" / "labels.npy"), [0, 1, 2])
    assert not (tmp_path / "latents" / "samples.npz").exists()

    vae_path, vae = tiny_vae_file(tmp_path / "vae.pt")
    decoding = ["--vae", str(vae_path), "--vae-kind", "tiny"]
    one_by_one, labels = sample_images(run, tmp_path / "b1", *flags, *decoding, "--batch-size", 1, "--png")
    together, _ = sample_images(run, tmp_path / "b3", *flags, *decoding, "--batch-size", 3)
    assert one_by_one.dtype == np.uint8 and one_by_one.shape == (3, 16, 16, 3) and np.array_equal(labels, [0, 1, 2])
    assert_same_images(together, one_by_one)
    with torch.no_grad():
        expected = to_uint8(vae.decode(torch.from_numpy(latents)))
    assert_same_images(one_by_one, expected)
    assert one_by_one.std() > 5 and len({image.tobytes() for image in one_by_one}) == 3
    for i, image in enumerate(one_by_one):
        with Image.open(tmp_path / "b1" / "images" / f"{i:06d}.png") as png:
            assert np.array_equal(np.asarray(png), image)
    assert (tmp_path / "b1" / "grid.png").is_file() and not (tmp_path / "b3" / "images").exists()
    assert not (tmp_path / "b1" / "latents.npy").exists()


def test_random_labels_come_from_each_samples_seed(run, tmp_path):
    """--labels random: label i drawn from numpy's generator seeded with seed + i, re-derived here; the same for any
    batch size, and from seed 1 the labels of seed 0 shifted by one."""
    flags = ["--labels", "random", "--sampler", "heun", "--steps", 1]
    _, one_by_one = sample_images(run, tmp_path / "b1", "--num-samples", 7, "--batch-size", 1, *flags)
    _, together = sample_images(run, tmp_path / "b7", "--num-samples", 7, "--batch-size", 7, *flags)
    _, from_seed_1 = sample_images(run, tmp_path / "s1", "--num-samples", 6, "--seed", 1, *flags)
    assert np.array_equal(one_by_one, [np.random.default_rng(i).integers(5) for i in range(7)])
    assert np.array_equal(together, one_by_one) and np.array_equal(from_seed_1, one_by_one[1:])
    assert not np.array_equal(one_by_one, np.arange(7) % 5)


def random_state(preset, scale=0.02, seed=0, **kwargs):
    """A random state dict of a preset at 64 px (8 x 8 latents), with the official checkpoints' key names."""
    with torch.device("meta"):
        shapes = MODELS[preset](input_size=8, **kwargs).state_dict()
    generator = torch.Generator().manual_seed(seed)
    return {key: scale * torch.randn(value.shape, generator=generator) for key, value in shapes.items()}


def foreign_latents(path, out, *flags):
    """sample.py on a foreign checkpoint at 64 px -> (latents times the VAE scale factor, settings)."""
    sample.main([str(path), "--image-size", "64", "--out", str(out), *map(str, flags)])
    return np.load(out / "latents.npy") * SD_VAE_SCALE_FACTOR, json.loads((out / "settings.json").read_text())


def seeded_noise(sample_index, shape=(4, 8, 8)):
    """Sample i's generator (seed 0 + i): its initial noise, then one draw per noisy step, in that order."""
    generator = torch.Generator().manual_seed(sample_index)
    return lambda: torch.randn(shape, generator=generator, dtype=torch.float32).double()


def test_official_dit_checkpoint_follows_dit_s_own_sampler(tmp_path):
    """A DiT-layout state dict (learned sigma: 8 output channels) sampled with --checkpoint-kind dit equals DiT's
    sample.py re-derived here from its diffusion/ code: 5 respaced timesteps, the learned-range variance, CFG on the
    first 3 channels with the 4th and the variance values from the conditional branch."""
    state = random_state("DiT-S/2", learn_sigma=True)
    torch.save(state, tmp_path / "dit.pt")  # the official files are raw EMA state dicts
    latents, settings = foreign_latents(tmp_path / "dit.pt", tmp_path / "out", "--checkpoint-kind", "dit",
                                        "--model", "DiT-S/2", "--num-samples", 2, "--steps", 5, "--cfg", 1.5)
    assert settings["sampler"] == "ddpm" and settings["network_evaluations_per_sample"] == 10

    model = MODELS["DiT-S/2"](input_size=8, learn_sigma=True)
    model.load_state_dict(state)
    kept = [0, 250, 500, 749, 999]  # space_timesteps(1000, "5"): round(249.75 i), 499.5 rounding half to even
    abar_all = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    abar = abar_all[kept]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1 - abar / abar_prev
    posterior_variance = betas * (1 - abar_prev) / (1 - abar)
    log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    labels, null = torch.tensor([0, 1]), torch.tensor([1000, 1000])
    draws = [seeded_noise(i) for i in range(2)]
    x = torch.stack([draw() for draw in draws])
    with torch.no_grad():
        for i in reversed(range(5)):
            t = torch.full((4,), kept[i])
            out, _ = model(torch.cat([x, x]).float(), t, torch.cat([labels, null]), with_variance=True)
            cond, uncond = out.double().chunk(2)
            eps = torch.cat([uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]), cond[:, 3:4]], dim=1)
            frac = (cond[:, 4:] + 1) / 2
            log_variance = frac * np.log(betas[i]) + (1 - frac) * log_variance_clipped[i]
            x0 = (x - np.sqrt(1 - abar[i]) * eps) / np.sqrt(abar[i])
            mean = (betas[i] * np.sqrt(abar_prev[i]) * x0 + (1 - abar_prev[i]) * np.sqrt(1 - betas[i]) * x) / (
                1 - abar[i])
            x = mean + (0.5 * log_variance).exp() * torch.stack([draw() for draw in draws]) if i > 0 else mean
    np.testing.assert_allclose(latents, x.numpy(), rtol=1e-4, atol=1e-5)


def test_official_sit_checkpoint_follows_sit_s_own_sde_sampler(tmp_path):
    """A SiT-layout file (learned sigma, time from noise s = 0 to data s = 1) sampled with --checkpoint-kind sit
    equals SiT's sample.py SDE re-derived here in its own time: Euler-Maruyama on s = linspace(0, 0.96, 6) with
    drift v + w score, w = sigma_s = 1 - s, noise sqrt(2 w) dW, score (s v - x) / (1 - s), then the Mean last step of
    0.04; CFG on 3 channels. The samples equal it only if the time and the sign are turned."""
    state = random_state("SiT-S/2", learn_sigma=True)
    torch.save({"ema": state}, tmp_path / "sit.pt")
    latents, settings = foreign_latents(tmp_path / "sit.pt", tmp_path / "out", "--checkpoint-kind", "sit",
                                        "--model", "SiT-S/2", "--num-samples", 2, "--steps", 6, "--cfg", 1.5)
    assert settings["sampler"] == "em" and settings["network_evaluations_per_sample"] == 12

    model = MODELS["SiT-S/2"](input_size=8, learn_sigma=True)
    model.load_state_dict(state)
    labels, null = torch.tensor([0, 1]), torch.tensor([1000, 1000])
    draws = [seeded_noise(i) for i in range(2)]
    x = torch.stack([draw() for draw in draws])
    times = np.linspace(0, 0.96, 6)
    dt = times[1] - times[0]

    def drift(x, s):
        out, _ = model(torch.cat([x, x]).float(), torch.full((4,), s, dtype=torch.float32), torch.cat([labels, null]))
        cond, uncond = out.double().chunk(2)
        velocity = torch.cat([uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
        return velocity + (1 - s) * (s * velocity - x) / (1 - s)
    with torch.no_grad():
        for s in times[:-1]:
            x = x + drift(x, s) * dt + np.sqrt(2 * (1 - s) * dt) * torch.stack([draw() for draw in draws])
        x = x + drift(x, times[-1]) * 0.04
    np.testing.assert_allclose(latents, x.numpy(), rtol=1e-4, atol=1e-5)


class KnownOutputs(torch.nn.Module):
    """A stand-in network whose outputs are known: final (1 + t) F[y] and intermediate (1 + t) I[y], constant
    fields; nothing to load (its values are no parameters), so any preset name can build it."""

    def __init__(self, input_size, in_channels, num_classes, learn_sigma, intermediate_block):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.class_dropout_prob, self.intermediate_head = 0.1, intermediate_block
        self.final_values, self.intermediate_values = torch.randn(2, num_classes + 1, in_channels, generator=generator)

    def forward(self, x, t, y):
        scale = (1 + t.double())[:, None, None, None]
        field = lambda values: scale * values[y][:, :, None, None].expand(x.shape).double()  # noqa: E731
        return field(self.final_values), field(self.intermediate_values)


def test_guidance_weights_and_intervals_follow_the_formulas(tmp_path, monkeypatch):
    """Heun on the grid 1, 0.5, 0 with a network that ignores x: the sample is noise - D(1) / 4 - 3 D(0.5) / 4.
    IG on [0.6, 1] acts at t = 1 only, CFG on [0, 0.7] at t = 0.5 only: D(1) = I + w (F - I) of the class,
    D(0.5) = F_null + s (F - F_null); 1 + 2 + 2 network evaluations."""
    monkeypatch.setitem(sample.MODELS, "known", KnownOutputs)
    torch.save({}, tmp_path / "known.pt")
    w, s = 1.7, 2.5
    latents, settings = foreign_latents(tmp_path / "known.pt", tmp_path / "out", "--checkpoint-kind", "ig-sit",
                                        "--model", "known", "--num-classes", 3, "--num-samples", 2, "--sampler",
                                        "heun", "--steps", 2, "--ig", w, "--ig-interval", 0.6, 1, "--cfg", s,
                                        "--cfg-interval", 0, 0.7)
    assert settings["network_evaluations_per_sample"] == 5
    network = KnownOutputs(8, 4, 3, False, 8)
    final, intermediate = (values.double()[:, :, None, None] for values in
                           (network.final_values, network.intermediate_values))
    for i in range(2):  # labels 0, 1; the null label is 3
        at_one = 2 * (intermediate[i] + w * (final[i] - intermediate[i]))
        at_half = 1.5 * (final[3] + s * (final[i] - final[3]))
        expected = seeded_noise(i)() - at_one / 4 - 3 * at_half / 4
        np.testing.assert_allclose(latents[i], expected.numpy(), rtol=1e-5, atol=1e-5)


def ig_release_file(path, **args):
    """An IG-release SiT-S/2 checkpoint: the head under final_layer_xr, the EMA weights, args if given."""
    release = {key.replace("intermediate_head.", "final_layer_xr."): value
               for key, value in random_state("SiT-S/2", intermediate_block=4).items()}
    torch.save({"ema": release, **({"args": argparse.Namespace(**args)} if args else {})}, path)
    return path


def test_ig_release_head_block_comes_from_the_file(tmp_path):
    """With encoder_depth 4 in its training args, the file samples as a head after block 4 given by hand, and not as
    the release default 8, which the same keys would also fit."""
    flags = ["--checkpoint-kind", "ig-sit", "--model", "SiT-S/2", "--ig", 3, "--num-samples", 2, "--sampler", "heun",
             "--steps", 2]
    with_args = ig_release_file(tmp_path / "with-args.pt", encoder_depth=4, model="SiT-S/2")
    without = ig_release_file(tmp_path / "without.pt")
    from_file, settings = foreign_latents(with_args, tmp_path / "file", *flags)
    by_hand, _ = foreign_latents(without, tmp_path / "hand", *flags, "--intermediate-block", 4)
    default, _ = foreign_latents(without, tmp_path / "default", *flags)
    assert settings["network_evaluations_per_sample"] == 3 and settings["cfg_channels"] is None
    np.testing.assert_array_equal(from_file, by_hand)
    assert np.abs(from_file - default).max() > 1e-3


def lightningdit_release_file(path, channels, input_size, seed=0):
    """An IG-release LightningDiT-tiny/1 checkpoint as its train.py writes it: the EMA weights with the head (after
    block 2) under final_layer_xr, and its yaml config, whose model.encoder_depth says where the head sits.
    -> the network with these weights (this repository's LightningDiT)"""
    model = LIGHTNINGDIT_MODELS["LightningDiT-tiny/1"](input_size=input_size, in_channels=channels,
                                                       intermediate_block=2)
    randomise(model, seed=seed)
    release = {key.replace("intermediate_head.", "final_layer_xr."): value for key, value in model.state_dict().items()}
    torch.save({"ema": release, "config": {"model": {"model_type": "LightningDiT-tiny/1", "encoder_depth": 2}}}, path)
    return model.eval()


def stats_file(path, channels, seed=4):
    generator = torch.Generator().manual_seed(seed)
    stats = {"mean": torch.randn(1, channels, 1, 1, generator=generator),
             "std": 0.5 + torch.rand(1, channels, 1, 1, generator=generator)}
    torch.save(stats, path)
    return stats


def test_ig_lightningdit_follows_the_release_sampler(tmp_path):
    """An IG-release LightningDiT file sampled with --checkpoint-kind ig-lightningdit (here on the tiny VAE's 4-channel
    latents, 8 x 8 at 32 px) equals the release's sampler re-derived in its own time s (0 noise -> 1 data): the grid
    s = 0.3 u / (1 - 0.7 u) on u = linspace(0, 1, 4), a Heun step on every interval (the last included), its
    forward_with_cfg (IG 1.4 on both branches, CFG 1.45 on every channel where s >= 0.19), then z * std + mean; and
    with --vae, those latents decoded. 2 + 3 + 4 network evaluations: CFG holds s = 0.375 and 1 of the grid."""
    model = lightningdit_release_file(tmp_path / "ig-lightningdit.pt", channels=4, input_size=8)
    stats = stats_file(tmp_path / "stats.pt", 4)
    flags = ["--checkpoint-kind", "ig-lightningdit", "--model", "LightningDiT-tiny/1", "--image-size", 32,
             "--vae-kind", "tiny", "--latent-stats", tmp_path / "stats.pt", "--num-samples", 2, "--steps", 3,
             "--ig", 1.4, "--cfg", 1.45, "--cfg-interval", 0, 0.81]
    sample.main([str(tmp_path / "ig-lightningdit.pt"), *map(str, flags), "--out", str(tmp_path / "latents")])
    latents = np.load(tmp_path / "latents" / "latents.npy")
    settings = json.loads((tmp_path / "latents" / "settings.json").read_text())
    assert settings["sampler"] == "heun" and settings["steps"] == 3 and settings["network_evaluations_per_sample"] == 9

    labels, null = torch.tensor([0, 1]), torch.tensor([1000, 1000])

    def release_forward_with_cfg(x, s):
        with torch.no_grad():  # the release's network: velocity x0 - eps at its time s
            final, intermediate = (-out.double() for out in model(torch.cat([x, x]).float(),
                                                                  torch.full((4,), 1 - s), torch.cat([labels, null])))
        guided = final + (1.4 - 1) * (final - intermediate)
        cond, uncond = guided.chunk(2)
        return uncond + 1.45 * (cond - uncond) if s >= 0.19 else cond

    x = torch.stack([seeded_noise(i, (4, 8, 8))() for i in range(2)])
    u = np.linspace(0, 1, 4)
    times = 0.3 * u / (1 + (0.3 - 1) * u)
    for s, s_next in zip(times[:-1], times[1:]):
        k1 = release_forward_with_cfg(x, s)
        k2 = release_forward_with_cfg(x + (s_next - s) * k1, s_next)
        x = x + (s_next - s) / 2 * (k1 + k2)
    expected = x * stats["std"] + stats["mean"]
    np.testing.assert_allclose(latents, expected.numpy(), rtol=1e-4, atol=1e-5)

    vae_path, vae = tiny_vae_file(tmp_path / "vae.pt")
    images, _ = sample_images(tmp_path / "ig-lightningdit.pt", tmp_path / "images", *flags, "--vae", vae_path)
    with torch.no_grad():
        assert_same_images(images, to_uint8(vae.decode(torch.from_numpy(latents))))
    assert images.shape == (2, 32, 32, 3)


BAD_INPUT = ["missing", "not a checkpoint", "another model", "ig without head", "foreign mismatch", "preset on own",
             "kind without preset", "flow sampler on dit", "head block on dit", "head block against the file",
             "sbdm on heun", "wrong vae kind", "vae of another channel count", "vae on a pixel model", "no stats",
             "missing stats", "stats of another channel count", "lightningdit as ig-sit",
             "lightningdit preset as ig-sit", "labels clash", "shift on em"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_exits_2_with_the_message_and_writes_nothing(case, run, tmp_path, capsys):
    lightningdit = [str(tmp_path / "lightningdit.pt"), "--checkpoint-kind", "ig-lightningdit", "--model",
                    "LightningDiT-tiny/1", "--image-size", "64"]
    argv, message = {
        "missing": ([str(tmp_path / "nowhere")], "no checkpoint at"),
        "not a checkpoint": ([str(tmp_path / "junk.pt")], "is not a PyTorch checkpoint"),
        "another model": ([str(run), "--checkpoint-kind", "ig-sit", "--model", "DiT-S/2"],
                          "does not fit DiT-S/2 as --checkpoint-kind ig-sit: missing keys"),
        "ig without head": ([str(make_run(tmp_path / "plain", intermediate_block=None)), "--ig", "2"],
                            "needs a model with the IG intermediate head"),
        "foreign mismatch": ([str(tmp_path / "dit-s4.pt"), "--checkpoint-kind", "dit", "--model", "DiT-S/2",
                              "--image-size", "64"],
                             "e.g. pos_embed expected (1, 16, 384), got (1, 4, 384); its key names are those of this "
                             "kind"),
        "preset on own": ([str(run), "--model", "DiT-S/2"], "--model and --intermediate-block describe a foreign"),
        "kind without preset": ([str(tmp_path / "dit.pt"), "--checkpoint-kind", "dit"], "dit needs --model"),
        "flow sampler on dit": ([str(tmp_path / "dit.pt"), "--checkpoint-kind", "dit", "--model", "DiT-S/2",
                                 "--image-size", "64", "--sampler", "em"],
                                "--sampler em does not fit a dit checkpoint"),
        "head block on dit": ([str(tmp_path / "dit.pt"), "--checkpoint-kind", "dit", "--model", "DiT-S/2",
                               "--intermediate-block", "4"], "a dit checkpoint has no IG intermediate head"),
        "head block against the file": ([str(tmp_path / "ig.pt"), "--checkpoint-kind", "ig-sit", "--model", "SiT-S/2",
                                         "--image-size", "64", "--intermediate-block", "8"],
                                        "training settings put the IG head after block 4"),
        "sbdm on heun": ([str(run), "--sampler", "heun", "--diffusion", "sbdm"], "em sampler's diffusion coefficient"),
        "wrong vae kind": ([str(tmp_path / "latent"), "--vae", str(tmp_path / "vae.pt")],
                           "is not a 'sd' VAE: its weights are those of the 'tiny' preset"),
        "vae of another channel count": ([str(tmp_path / "latent"), "--vae-kind", "vavae-f16d32"],
                                         "a 'vavae-f16d32' VAE has 32 latent channels, this model 4"),
        "vae on a pixel model": ([str(run), "--vae", str(tmp_path / "vae.pt")], "are for latent models"),
        "no stats": ([*lightningdit], "--latent-stats PATH (latents_stats.pt of the release or of prepare.py)"),
        "missing stats": ([*lightningdit, "--latent-stats", str(tmp_path / "nowhere.pt")], "nowhere.pt: no such file"),
        "stats of another channel count": ([*lightningdit, "--latent-stats", str(tmp_path / "stats.pt")],
                                           "holds statistics of 4 channels, this model's latents have 32"),
        "lightningdit as ig-sit": ([str(tmp_path / "lightningdit.pt"), "--checkpoint-kind", "ig-sit", "--model",
                                    "SiT-S/2", "--image-size", "64"],
                                   "its key names are those of --checkpoint-kind ig-lightningdit"),
        "lightningdit preset as ig-sit": ([str(tmp_path / "lightningdit.pt"), "--checkpoint-kind", "ig-sit", "--model",
                                           "LightningDiT-tiny/1"], "is no preset of a ig-sit checkpoint"),
        "labels clash": ([str(run), "--class-label", "1", "--labels", "random"], "--labels random draws them"),
        "shift on em": ([str(run), "--timestep-shift", "0.5"], "shifts the heun sampler's grid, not em's"),
    }[case]
    (tmp_path / "junk.pt").write_bytes(b"\x00 not a pickle")
    if case == "foreign mismatch":
        torch.save(MODELS["DiT-S/4"](input_size=8, learn_sigma=True).state_dict(), tmp_path / "dit-s4.pt")
    if "dit" in case.split():
        torch.save(random_state("DiT-S/2", learn_sigma=True), tmp_path / "dit.pt")
    if case == "head block against the file":
        ig_release_file(tmp_path / "ig.pt", encoder_depth=4)
    if "vae" in case:
        make_run(tmp_path / "latent", data="latents", patch_size=2)
        tiny_vae_file(tmp_path / "vae.pt")
    if "stats" in case or "lightningdit" in case:  # the release's layout: 32 channels, 4 x 4 latents at 64 px
        lightningdit_release_file(tmp_path / "lightningdit.pt", channels=32, input_size=4)
        stats_file(tmp_path / "stats.pt", 4)
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error
    assert error.count("\n") == 1 and len(error) < 600  # one sentence, not a key dump
    assert not (tmp_path / "out").exists()
