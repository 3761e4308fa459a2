"""The InnerControl pipeline as train.py runs (shapes/runs.py): captions tokenised; every stage trains through the one
loop; the Eq. 8 stage starts from --init and resumes bitwise; its reward and alignment terms act exactly inside their
timestep ranges; bad input (unknown task, a run of the wrong job, a missing reward model, a probe for another UNet)
exits 2 naming what was expected."""
import re

import pytest
import torch

import train
from ref import runtime
from ref.checkpoints import read_checkpoint
from ref.probes import ReadoutProbe
from ref.unet import MODELS as UNETS
from shapes import pipeline, runs
from shapes import sampling as shapes_sampling
from shapes.data import Shapes
from shapes.text import PAD
from tests.helpers import assert_same_state, train_error

torch.set_num_threads(1)
SMALL = ["--batch-size", "4", "--log-every", "1", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Base UNet, depth reward estimator, depth probe and a fine-tuned ControlNet, a few steps each."""
    root = tmp_path_factory.mktemp("pipeline")
    folders = {name: root / name for name in ("unet", "reward", "probe", "controlnet")}
    base = ["--base", str(folders["unet"] / "latest.pt")]
    train.main(["--config", "shapes-unet", "--steps", "2", *SMALL, "--out", str(folders["unet"])])
    train.main(["--config", "shapes-estimator-reward", "--steps", "2", *SMALL, "--out", str(folders["reward"])])
    train.main(["--config", "shapes-probe", "--steps", "2", *SMALL, *base, "--out", str(folders["probe"])])
    train.main(["--config", "shapes-controlnet", "--steps", "2", *SMALL, *base, "--out", str(folders["controlnet"])])
    return {name: path / "latest.pt" for name, path in folders.items()}


def innercontrol_flags(stages, **overrides):
    flags = dict(dict(config="shapes-innercontrol", base=stages["unet"], probe=stages["probe"],
                      reward_model=stages["reward"], init=stages["controlnet"], steps=4), **overrides)
    return [item for name, value in flags.items() for item in (f"--{name.replace('_', '-')}", str(value))] + SMALL


def test_tokenizer_ids_padding_and_errors():
    tokenizer = pipeline.CAPTION_TOKENIZER
    tokens = tokenizer(["a red circle and a blue square", ""])
    words = tokenizer.vocabulary
    assert tokens[0, :7].tolist() == [words.index(w) + 1 for w in "a red circle and a blue square".split()]
    assert (tokens[0, 7:] == PAD).all() and (tokens[1] == PAD).all()
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['purple'\]"):
        tokenizer(["a purple circle"])
    with pytest.raises(ValueError, match="at most 11 fit"):
        tokenizer(["a red circle and " * 3 + "a red circle"])
    every_caption = [Shapes(32)[index].caption for index in range(50)]  # every scene's caption tokenises
    assert tokenizer(every_caption).shape == (50, 11)


def test_every_stage_trained_and_the_controlnet_starts_from_the_base(stages):
    for name, path in stages.items():
        checkpoint = read_checkpoint(path)
        assert checkpoint["step"] == 2 and checkpoint["args"]["job"] == {"reward": "estimator"}.get(name, name)
    controlnet, _ = runs.load_trained(stages["controlnet"], "controlnet", weights="model")
    base, _ = runs.load_trained(stages["unet"], "unet")
    copied = {key: value for key, value in base.unet.state_dict().items() if key.startswith("input_blocks.")}
    moved = [key for key, value in copied.items() if not torch.equal(controlnet.state_dict()[key], value)]
    assert moved  # two steps of training moved the encoder copy, which started as the base's (ControlNet.from_unet)


def test_innercontrol_starts_from_init_and_resumes_bitwise(stages, tmp_path):
    config, _ = train.parse_args(innercontrol_flags(stages))
    started = runs.make_run(config).build()
    assert_same_state(started.state_dict(), read_checkpoint(stages["controlnet"])["model"])
    train.main(innercontrol_flags(stages, out=tmp_path / "whole"))
    train.main(innercontrol_flags(stages, out=tmp_path / "split", stop_after=2))
    checkpoint = read_checkpoint(tmp_path / "split" / "latest.pt")  # as written before the field eq8_reduction
    del checkpoint["args"]["eq8_reduction"], checkpoint["digests"]  # nor the digests, which came later
    torch.save(checkpoint, tmp_path / "split" / "latest.pt")
    assert runs.load_trained(tmp_path / "split" / "latest.pt", "controlnet")[1]["eq8_reduction"] == "unbiased"
    train.main(innercontrol_flags(stages, out=tmp_path / "split"))
    whole, split = (read_checkpoint(tmp_path / name / "latest.pt") for name in ("whole", "split"))
    assert_same_state(split["model"], whole["model"])
    assert_same_state(split["ema"], whole["ema"])
    assert not torch.equal(whole["model"]["zero_convs.0.0.weight"], started.state_dict()["zero_convs.0.0.weight"])


def test_eq8_terms_act_exactly_inside_their_ranges(stages):
    """Same batch and draws: with ranges over every step (P(range) = 1) the loss is the diffusion loss alone (alpha =
    beta = 0) plus exactly alpha x reward + beta x alignment; a range holding no step is refused."""
    def per_sample_loss(**overrides):
        config, _ = train.parse_args(innercontrol_flags(stages, **overrides))
        run = runs.make_run(config)
        torch.manual_seed(0)
        net = run.build()
        dataset = run.make_dataset()
        batch = run.collate([dataset[i] for i in range(4)])
        with torch.no_grad():
            return run.loss(net, batch, runtime.SampleDraws(range(4)), torch.device("cpu")), run, net, batch

    plain, *_ = per_sample_loss(alpha=0, beta=0)
    with pytest.raises(ValueError, match=r"timestep range \(1000, 1000\) holds none of the steps 0..999"):
        per_sample_loss(reward_range="1000,1000", align_range="1000,1000")
    full, run, net, (x0, tokens, control) = per_sample_loss(reward_range="0,999", align_range="0,999")
    draws = runtime.SampleDraws(range(4))  # the draws of the run's step, in its order: caption dropout, t, eps
    tokens = pipeline.drop_captions(tokens, run.config["label_dropout"], draws)
    t, eps, hint = draws.randint(1000), draws.randn(*x0.shape[1:]), control
    terms = run.terms
    with torch.no_grad():
        x_t = run.schedule.add_noise(x0, eps, t)
        eps_hat, features = run.base.unet(x_t, t, run.base.text_encoder(tokens), control=net(
            x_t, hint, t, run.base.text_encoder(tokens)), taps=terms.tap_mode)
        def peak_one(maps):  # (B, 1, H, W) depth, each sample divided by its maximum
            return maps / maps.flatten(1).amax(1)[:, None, None, None]
        reward = terms.reward_model(run.schedule.x0_from_eps(x_t, eps_hat, t))  # (B, 1, H, W) depth in [0, 1]
        reward = (peak_one(reward) - peak_one(control)).square().flatten(1).mean(1)
        read = (terms.probe(features, run.base.unet.embed_time(t)) + 1) / 2  # (B, 1, H, W)
        alignment = (peak_one(read) - peak_one(control)).square().flatten(1).mean(1)
    torch.testing.assert_close(full, plain + 0.5 * reward + 1.0 * alignment, rtol=1e-5, atol=1e-6)
    # --eq8-reduction release over the two earliest draws' steps: each in-range term times B / N = 4 / 2
    high = int(t.sort().values[1])
    release, *_ = per_sample_loss(reward_range=f"0,{high}", align_range=f"0,{high}", eq8_reduction="release")
    in_range = (t <= high).float()
    assert in_range.sum() == 2
    torch.testing.assert_close(release, plain + 2 * in_range * (0.5 * reward + 1.0 * alignment), rtol=1e-5, atol=1e-6)


def test_bad_pipeline_input_exits_2_naming_what_was_expected(stages, tmp_path, capsys):
    cases = [
        (["--config", "shapes-probe", "--task", "normals"],
         "unknown task 'normals'; choose one of depth, segmentation"),
        (["--config", "shapes-probe", "--base", str(stages["reward"])],
         "is a 'estimator' run; a 'unet' run was expected"),
        (["--config", "shapes-probe", "--base", str(tmp_path / "none.pt")], "cannot open"),
        (innercontrol_flags(stages, reward_model=""), "needs --reward-model"),
        (innercontrol_flags(stages, task="segmentation"), "is a estimator run for the task 'depth'"),
    ]
    for flags, message in cases:
        error = train_error([*flags, *SMALL, "--out", tmp_path / "run"], capsys)
        assert error.startswith("error: ") and message in error and "Traceback" not in error
        assert not (tmp_path / "run").exists()


def test_a_probe_for_another_unet_is_refused_naming_both_channel_lists():
    tiny, wider = UNETS["tiny"](), UNETS["tiny"](model_channels=64)
    probe = ReadoutProbe(tiny.tap_channels("conv"), tiny.time_embed[-1].out_features, 1, 32, 32)
    runs.check_probe_fits(probe, tiny, "conv", "probe.pt")
    assert wider.tap_channels("conv") == [2 * c for c in tiny.tap_channels("conv")]
    with pytest.raises(ValueError, match=re.escape(
            f"probe.pt was trained on 4 'conv' feature maps with channels {tiny.tap_channels('conv')} and a timestep "
            f"embedding of width 128; this base UNet gives 4 maps with channels {wider.tap_channels('conv')} and "
            f"width 256")):
        runs.check_probe_fits(probe, wider, "conv", "probe.pt")


def test_stochastic_ddim_samples_depend_on_each_sample_seed_alone(stages):
    """eta 1 (the experiment's sampler): a sample's image is the same in a batch of 1 or 3 and on rank 1 of 2 (its
    step noise comes from its own seed), and differs from the deterministic eta 0 one from the same start noise."""
    base, controlnet, config = shapes_sampling.load_controlnet(stages["controlnet"])

    def share(rank=0, world_size=1, batch_size=3, eta=1.0):
        world = runtime.Distributed(rank, world_size, torch.device("cpu"))
        return shapes_sampling.controlnet_share(base, controlnet, config, world, 3, 3, 2.0, seed=5,
                                                batch_size=batch_size, eta=eta)
    indices, batched = share()
    assert list(indices) == [0, 1, 2]
    assert (share(batch_size=1)[1] == batched).all()
    assert (share(rank=1, world_size=2)[1] == batched[1:2]).all()
    assert (share(eta=0.0)[1] != batched).any()
