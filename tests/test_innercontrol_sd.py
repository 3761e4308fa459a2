"""InnerControl at SD scale (ref/innercontrol_sd.py, ref/control_data.py) on tiny SD-layout parts written to files in
the test (an SD single file, a BPE vocabulary, a TorchScript segmenter, data folders): the data's crop and its errors
naming the line; gradients reach the ControlNet from the reward (through the VAE decoder) and the alignment terms and
nothing frozen, out-of-range samples add nothing; gradient accumulation gives the gradient of the whole batch; a 2-step
Eq. 8 run via train.main resumed after --stop-after is bitwise the uninterrupted one, and the next stage starts from its
EMA weights; the probe run trains and its loss falls on one overfitted batch; lineart's reward runs with the LineArt
annotator at Table 4's alpha, and the other edge annotator's file is refused in one line."""
import functools
import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script  # the script eval.py; named so the builtin eval stays unshadowed
import train
from ref.clip import MODELS as TEXT_ENCODERS
from ref.control_data import ControlDataset
from ref.controlnet import ControlNet
from ref.checkpoints import read_checkpoint
from ref.hed import HEDAnnotator
from ref.innercontrol_sd import SD_CONFIGS, SD_SIZES
from ref.lineart import LineArtAnnotator
from ref.runtime import Distributed, SampleDraws
from ref.trainer import accumulate_gradients
from ref.unet import UNet
from ref.vae import MODELS as AUTOENCODERS
from tests.helpers import assert_same_state, randomise, train_error, write_folder

torch.set_num_threads(1)
SIZE = 16  # training resolution: 4 x 4 latents of the tiny f4 VAE
CLASSES = 4
data_folder = functools.partial(write_folder, size=SIZE, classes=CLASSES,
                                generator=np.random.default_rng(0))  # one image stream for the whole module


def write_sd_file(path):
    """A tiny SD single file: UNet, VAE and text encoder under their SD1.5 prefixes, every weight random (no zero
    layer, so every path passes a gradient)."""
    torch.manual_seed(0)
    parts = {"model.diffusion_model.": UNet(**SD_SIZES["tiny"]["unet"]), "first_stage_model.": AUTOENCODERS["tiny"](),
             "cond_stage_model.transformer.": TEXT_ENCODERS["clip-tiny"]()}
    state = {}
    for prefix, model in parts.items():
        for key, value in model.state_dict().items():
            state[prefix + key] = torch.randn_like(value) * 0.1 if value.is_floating_point() else value
    torch.save(state, path)
    return path


class TinySegmenter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, CLASSES, 3, padding=1)

    def forward(self, x):
        return self.conv(x)[:, :, ::2, ::2]  # stride-2 logits, as a real segmenter's coarser output


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tokenizer = root / "bpe.txt.gz"
    with gzip.open(tokenizer, "wt", encoding="utf-8") as file:
        file.write("#version: 0.2\nc a\nca t</w>\nt h\nth e</w>\na t</w>\n")
    segmenter = root / "segmenter.pt"
    torch.manual_seed(1)
    torch.jit.script(TinySegmenter()).save(str(segmenter))
    flags = ["--sd-size", "tiny", "--sd15", write_sd_file(root / "sd.ckpt"), "--tokenizer", tokenizer,
             "--image-size", SIZE, "--num-classes", CLASSES, "--workers", "0", "--log-every", "1"]
    paths = dict(root=root, flags=flags, segmenter=segmenter,
                 segmentation=data_folder(root / "segmentation", "segmentation"),
                 depth=data_folder(root / "depth", "depth"))
    for task in ("segmentation", "depth"):  # 2 steps of each task's probe run: what the ControlNet runs read
        train.main(list(map(str, ["--config", "sd15-probe", *flags, "--task", task, "--data-path", paths[task],
                                  "--probe-resolution", 4, "--probe-width", 16, "--batch-size", 2, "--steps", 2,
                                  "--out", root / f"probe-{task}"])))
        paths[f"probe-{task}"] = root / f"probe-{task}" / "latest.pt"
    return paths


def controlnet_config(files, **overrides):
    argv = ["--config", "sd15-innercontrol", *files["flags"], "--task", "segmentation", "--data-path",
            files["segmentation"], "--controlnet-init", "none", "--reward-model", files["segmenter"],
            "--probe", files["probe-segmentation"], "--batch-size", 4, "--grad-accumulation", 2]
    for name, value in overrides.items():
        argv += [f"--{name.replace('_', '-')}", value]
    config, _ = train.parse_args(list(map(str, argv)))
    return dict(config, controlnet_init=None)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------

def test_image_and_control_are_cut_alike_and_labels_stay_labels(tmp_path):
    """A 20 x 16 sample at 16 px: no resize, the central 16 columns (from 2) of every file. A 40 x 32 label map at
    16 px keeps only classes it has (nearest)."""
    folder = data_folder(tmp_path / "seg", "segmentation", samples=1)
    image, hint, labels, caption = ControlDataset(folder, "segmentation", SIZE)[0]
    record = json.loads((folder / "metadata.jsonl").read_text())
    source = {key: np.asarray(Image.open(folder / record[key])) for key in ("image", "control", "hint")}
    crop = {key: torch.from_numpy(pixels[:, 2:18].astype(np.float32)) for key, pixels in source.items()}
    assert torch.equal(image, crop["image"].permute(2, 0, 1) / 127.5 - 1)
    assert torch.equal(labels, crop["control"].long())
    assert torch.equal(hint, crop["hint"].permute(2, 0, 1) / 255)
    assert caption == "a cat"
    big = data_folder(tmp_path / "big", "segmentation", samples=1, width=40, height=32)
    labels = ControlDataset(big, "segmentation", SIZE)[0][2]
    assert labels.shape == (SIZE, SIZE) and set(labels.unique().tolist()) <= {0, 1, 2, 3, 255}
    depth = data_folder(tmp_path / "depth", "depth", samples=1)
    _, hint, control, _ = ControlDataset(depth, "depth", SIZE)[0]
    grey = np.asarray(Image.open(depth / "depth0.png"))[:, 2:18].astype(np.float32) / 255
    assert torch.allclose(control[0], torch.from_numpy(grey), atol=1e-6)
    assert torch.equal(hint, control.expand(3, -1, -1))


def test_square_resize_squashes_every_file_whole_as_the_release(tmp_path):
    """--resize square (the InnerControl release's Resize((512, 512))): a 32 x 16 label map whose column x holds
    class x lands at 16 x 16 with the columns 1, 3, ..., 31 (nearest: pixel j reads the source at (j + 1/2) x 2);
    the centre crop keeps the columns 8 ... 23. The image is squashed alike (bicubic)."""
    folder = data_folder(tmp_path / "seg", "segmentation", samples=1, width=2 * SIZE, height=SIZE)
    columns = np.tile(np.arange(2 * SIZE, dtype=np.uint8), (SIZE, 1))  # (16, 32): class = column
    Image.fromarray(columns).save(folder / "labels0.png")
    image, _, labels, _ = ControlDataset(folder, "segmentation", SIZE, resize="square")[0]
    assert torch.equal(labels, torch.arange(1, 2 * SIZE, 2).expand(SIZE, SIZE))
    assert torch.equal(ControlDataset(folder, "segmentation", SIZE)[0][2], torch.arange(8, 24).expand(SIZE, SIZE))
    squashed = Image.open(folder / "image0.png").resize((SIZE, SIZE), Image.BICUBIC)
    assert torch.equal(image, torch.from_numpy(np.asarray(squashed, np.float32)).permute(2, 0, 1) / 127.5 - 1)
    with pytest.raises(ValueError, match="unknown --resize 'stretch'; choose one of crop, square"):
        ControlDataset(folder, "segmentation", SIZE, resize="stretch")


def edit_first_line(folder, change):
    path = folder / "metadata.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = change(json.loads(lines[0]))
    path.write_text("\n".join(lines) + "\n")


BAD_LINES = {
    "no caption": (lambda r: json.dumps({k: v for k, v in r.items() if k != "caption"}),
                   r"metadata\.jsonl line 1 has no caption; expected the keys image, control, caption, hint"),
    "caption not text": (lambda r: json.dumps(dict(r, caption=3)), r"line 1: the caption must be text, got 3"),
    "missing file": (lambda r: json.dumps(dict(r, control="gone.png")), r"line 1: control 'gone\.png' is no file in"),
    "no hint": (lambda r: json.dumps({k: v for k, v in r.items() if k != "hint"}),
                r"line 1 has no hint; .* the colour-coded hint"),
    "not json": (lambda r: "{image: 1}", r"line 1 is not JSON"),
    "rgb label map": (lambda r: json.dumps(dict(r, control=r["hint"])),
                      r"metadata\.jsonl line 1: control .*hint0\.png is a RGB image; expected a label map"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_a_bad_metadata_line_is_named_with_what_was_expected(case, tmp_path):
    folder = data_folder(tmp_path / "seg", "segmentation", samples=2)
    change, message = BAD_LINES[case]
    edit_first_line(folder, change)
    with pytest.raises(ValueError, match=message):
        ControlDataset(folder, "segmentation", SIZE)[0]


def test_a_colour_depth_map_stops_train_with_one_error_line(files, tmp_path, capsys):
    folder = data_folder(tmp_path / "depth", "depth", samples=2)
    edit_first_line(folder, lambda r: json.dumps(dict(r, control=r["image"])))
    error = train_error(["--config", "sd15-probe", *files["flags"], "--task", "depth", "--data-path", folder,
                         "--probe-resolution", 4, "--probe-width", 16, "--out", tmp_path / "out"], capsys)
    assert error.count("\n") == 1 and "line 1: control" in error and "expected a grey depth map" in error
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The Eq. 8 step
# ---------------------------------------------------------------------------------------------------------------------

def controlnet_gradients(config, seed=0):
    """The run's ControlNet gradient on its first 4 samples (all draws fixed), the run and the loss."""
    run = train.make_run(config)
    torch.manual_seed(seed)
    net = run.build()
    batch = run.collate([run.make_dataset()[index] for index in range(4)])
    loss = run.loss(net, batch, SampleDraws(range(4)), torch.device("cpu")).mean()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()]), run, loss.detach()


def test_gradients_reach_the_controlnet_from_both_terms_and_nothing_frozen(files):
    everything = dict(reward_range="0,999", align_range="0,999")
    diffusion, _, _ = controlnet_gradients(controlnet_config(files, alpha=0, beta=0))
    with_reward, _, _ = controlnet_gradients(controlnet_config(files, alpha=1, beta=0, **everything))
    with_alignment, _, _ = controlnet_gradients(controlnet_config(files, alpha=0, beta=1, **everything))
    assert (with_reward - diffusion).abs().max() > 1e-6 and (with_alignment - diffusion).abs().max() > 1e-6
    _, run, _ = controlnet_gradients(controlnet_config(files, alpha=1, beta=1, **everything))
    frozen = [run.base.unet, run.base.vae, run.base.text_encoder, run.terms.probe, run.terms.reward_model]
    for network in frozen:
        assert all(not p.requires_grad and p.grad is None for p in network.parameters())


def test_out_of_range_samples_add_nothing(files):
    """Ranges that hold none of the drawn steps leave the plain diffusion gradient, bitwise."""
    diffusion, _, _ = controlnet_gradients(controlnet_config(files, alpha=0, beta=0))
    draws = SampleDraws(range(4))
    _ = draws.rand(1), draws.randn(4, 4, 4)  # caption dropout, posterior noise: then t
    low = int(draws.randint(1000).min())
    outside, _, _ = controlnet_gradients(controlnet_config(files, alpha=1, beta=1, reward_range=f"0,{low - 1}",
                                                       align_range=f"0,{low - 1}"))
    assert torch.equal(outside, diffusion)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(files, monkeypatch):
    """--gradient-checkpointing recomputes the UNet's and the ControlNet's blocks in the backward pass (each block call
    counted) and changes no number of the Eq. 8 step."""
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs))
    config = controlnet_config(files, alpha=1, beta=1, reward_range="0,999", align_range="0,999")
    steps = {}
    for flag in (False, True):
        calls.clear()
        gradient, run, loss = controlnet_gradients(dict(config, gradient_checkpointing=flag))
        steps[flag] = gradient, loss, len(calls), run.base.unet.gradient_checkpointing
    assert steps[False][2:] == (0, False) and steps[True][3]
    assert steps[True][2] >= 2 * (len(run.base.unet.input_blocks) + 1)  # the UNet's and the ControlNet's encoders
    assert torch.allclose(steps[True][1], steps[False][1], rtol=1e-6, atol=0)
    assert torch.allclose(steps[True][0], steps[False][0], rtol=1e-5, atol=1e-9)


def test_gradient_accumulation_gives_the_whole_batchs_gradient(files):
    config = controlnet_config(files, alpha=1, beta=1, reward_range="0,999", align_range="0,999")
    run = train.make_run(config)
    batch = run.collate([run.make_dataset()[index] for index in range(4)])
    world = Distributed(0, 1, torch.device("cpu"))
    gradients, losses = [], []
    for micro_batches in (1, 2):
        torch.manual_seed(0)
        net = run.build()
        losses.append(accumulate_gradients(run, net, batch, np.arange(4), dict(config, grad_accumulation=micro_batches),
                                           world))
        gradients.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(losses[1], losses[0])


def test_micro_batches_that_do_not_divide_the_batch_are_refused(files, tmp_path, capsys):
    error = train_error(["--config", "sd15-controlnet", *files["flags"], "--task", "depth", "--data-path",
                         files["depth"], "--batch-size", 4, "--grad-accumulation", 3, "--out", tmp_path / "out"],
                        capsys)
    assert "--grad-accumulation 3 does not divide a rank's 4 samples of the batch into equal micro-batches" in error


def test_eq8_run_resumed_after_stop_after_is_bitwise_the_uninterrupted_one(files, tmp_path):
    argv = ["--config", "sd15-innercontrol", *files["flags"], "--task", "segmentation", "--data-path",
            files["segmentation"], "--controlnet-init", "none", "--reward-model", files["segmenter"],
            "--probe", files["probe-segmentation"], "--reward-range", "0,999", "--batch-size", 4,
            "--grad-accumulation", 2, "--steps", 2]
    argv = list(map(str, argv))
    train.main([*argv, "--out", str(tmp_path / "whole")])
    train.main([*argv, "--out", str(tmp_path / "split"), "--stop-after", "1"])
    assert read_checkpoint(tmp_path / "split" / "latest.pt")["step"] == 1
    train.main([*argv, "--out", str(tmp_path / "split")])
    whole, split = (read_checkpoint(tmp_path / name / "latest.pt") for name in ("whole", "split"))
    assert_same_state({k: whole[k] for k in ("model", "ema", "opt", "step")},
                      {k: split[k] for k in ("model", "ema", "opt", "step")})
    # the next stage starts from the run's EMA weights (sd15-innercontrol's --controlnet-init)
    config = dict(controlnet_config(files), controlnet_init=str(tmp_path / "whole" / "latest.pt"))
    assert_same_state(train.make_run(config).build().state_dict(), whole["ema"])


def test_a_run_stored_before_resize_and_weight_decay_resumes_as_it_was_trained(files, tmp_path, capsys):
    """A checkpoint without the fields `resize` and `weight_decay` reads as the centre crop and no weight decay (the
    settings it was trained with): resumed with today's defaults (square, 1e-2, no caption dropout) it is refused,
    naming each difference; with its own settings it resumes."""
    argv = list(map(str, ["--config", "sd15-controlnet", *files["flags"], "--task", "depth", "--data-path",
                          files["depth"], "--batch-size", 2, "--grad-accumulation", 1, "--steps", 2]))
    old = [*argv, "--resize", "crop", "--weight-decay", "0", "--label-dropout", "0.1", "--out", str(tmp_path)]
    train.main([*old, "--stop-after", "1"])
    checkpoint = read_checkpoint(tmp_path / "latest.pt")
    del checkpoint["args"]["resize"], checkpoint["args"]["weight_decay"]
    del checkpoint["digests"]  # a checkpoint that old stored no digests either
    torch.save(checkpoint, tmp_path / "latest.pt")
    error = train_error([*argv, "--out", tmp_path], capsys)
    for difference in ("label_dropout: stored 0.1, given 0.0", "resize: stored 'crop', given 'square'",
                       "weight_decay: stored 0.0, given 0.01"):
        assert difference in error
    train.main(old)
    resumed = read_checkpoint(tmp_path / "latest.pt")
    assert resumed["step"] == 2 and (resumed["args"]["resize"], resumed["args"]["weight_decay"]) == ("crop", 0.0)
    assert resumed["opt"]["param_groups"][0]["weight_decay"] == 0.0


def other_base(checkpoint):
    """A probe whose first bottleneck reads 8 channels more than this UNet's first tap has."""
    weight = checkpoint["ema"]["bottlenecks.0.conv1.weight"]  # (P/4, C, 1, 1)
    checkpoint["ema"]["bottlenecks.0.conv1.weight"] = torch.zeros(weight.shape[0], weight.shape[1] + 8, 1, 1)


WRONG_PROBES = {
    "task": ("probe-depth", None, "is a probe for task 'depth'; task 'segmentation' expected here"),
    "size": ("probe-segmentation", lambda checkpoint: checkpoint["args"].update(sd_size="sd15"),
             "is a probe for sd_size 'sd15'; sd_size 'tiny' expected here"),
    "channels": ("probe-segmentation", other_base,
                 f"this UNet's conv taps have {UNet(**SD_SIZES['tiny']['unet']).tap_channels('conv')}"),
    "job": ("probe-segmentation", lambda checkpoint: checkpoint["args"].update(job="sd-controlnet"),
            "is a 'sd-controlnet' run; a 'sd-probe' run was expected here"),
}


@pytest.mark.parametrize("case", list(WRONG_PROBES))
def test_a_probe_for_another_base_is_refused_in_one_line(case, files, tmp_path, capsys):
    source, change, expected = WRONG_PROBES[case]
    probe = files[source]
    if source != "probe-depth":
        checkpoint = read_checkpoint(probe)
        change(checkpoint)
        del checkpoint["digests"]  # edited on purpose: a file written without digests, not a damaged one
        probe = tmp_path / "probe.pt"
        torch.save(checkpoint, probe)
    error = train_error(["--config", "sd15-innercontrol", *files["flags"], "--task", "segmentation", "--data-path",
                         files["segmentation"], "--controlnet-init", "none", "--reward-model", files["segmenter"],
                         "--probe", probe, "--out", tmp_path / "run"], capsys)
    assert error.startswith("error: ") and error.count("\n") == 1 and expected in error, error


def test_the_lineart_reward_trains_with_the_lineart_annotator_at_table_4s_alpha(files, tmp_path):
    """sd15-innercontrol --task lineart --reward-model sk_model.pth: Table 4's alpha 10 on [0, 200] by default, D the
    LineArt annotator loaded from the file; over [0, 999] its reward changes the ControlNet's gradient."""
    torch.manual_seed(2)
    torch.save(randomise(LineArtAnnotator()).state_dict(), tmp_path / "sk_model.pth")
    lineart = dict(task="lineart", data_path=data_folder(tmp_path / "lineart", "lineart"),
                   reward_model=tmp_path / "sk_model.pth", beta=0)
    run = train.make_run(controlnet_config(files, **lineart))
    assert (run.terms.alpha, run.terms.reward_range, run.terms.reward_kind) == (10.0, (0, 200), "mse")
    assert isinstance(run.terms.reward_model, LineArtAnnotator)
    torch.testing.assert_close(run.terms.reward_model.state_dict(), torch.load(tmp_path / "sk_model.pth"))
    diffusion, _, _ = controlnet_gradients(controlnet_config(files, **dict(lineart, alpha=0)))
    with_reward, _, _ = controlnet_gradients(controlnet_config(files, **lineart, reward_range="0,999"))
    assert (with_reward - diffusion).abs().max() > 1e-6


@pytest.mark.parametrize("task, given, expected", [
    ("lineart", "hed", "holds the HED annotator's weights (ControlNetHED_Apache2: norm, block1.convs.0 ... "
                       "block5.projection), not the LineArt annotator's weights (sk_model.pth: model0 ... model4 "
                       "keys)"),
    ("hed", "lineart", "holds the LineArt annotator's weights (sk_model.pth: model0 ... model4 keys), not the HED "
                       "annotator's weights")])
def test_the_other_annotators_file_is_refused_in_one_line(task, given, expected, files, tmp_path, capsys):
    annotator = {"hed": HEDAnnotator, "lineart": LineArtAnnotator}[given]()
    torch.save(annotator.state_dict(), tmp_path / f"{given}.pth")
    error = train_error(["--config", "sd15-innercontrol", *files["flags"], "--task", task, "--data-path",
                         data_folder(tmp_path / task, task), "--controlnet-init", "none", "--beta", "0",
                         "--reward-model", tmp_path / f"{given}.pth", "--out", tmp_path / "run"], capsys)
    assert error.startswith("error: ") and error.count("\n") == 1 and expected in error, error
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The probe run
# ---------------------------------------------------------------------------------------------------------------------

def test_probe_loss_falls_on_one_overfitted_batch(files):
    assert read_checkpoint(files["probe-depth"])["step"] == 2  # the fixture's 2-step runs
    config, _ = train.parse_args(list(map(str, ["--config", "sd15-probe", *files["flags"], "--task", "depth",
                                                "--data-path", files["depth"], "--probe-resolution", 4,
                                                "--probe-width", 16])))
    run = train.make_run(config)
    torch.manual_seed(0)
    probe = run.build()
    assert probe.feature_channels == run.base.unet.tap_channels("attn")  # depth reads the attention features
    batch = run.collate([run.make_dataset()[index] for index in range(4)])
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        loss = run.loss(probe, batch, SampleDraws(range(4)), torch.device("cpu")).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_the_sd_configs_are_the_papers_settings():
    probe, plain, eq8 = (SD_CONFIGS[name] for name in ("sd15-probe", "sd15-controlnet", "sd15-innercontrol"))
    assert (probe["lr"], probe["batch_size"], probe["steps"], probe["probe_resolution"]) == (1e-3, 8, 5000, 64)
    for config in (plain, eq8):
        assert (config["lr"], config["batch_size"], config["grad_clip"], config["image_size"]) == (1e-5, 256, 1.0, 512)
    assert (plain["alpha"], plain["beta"]) == (0.0, 0.0) and (eq8["alpha"], eq8["beta"]) == (None, None)
    # the release's where the paper is silent: weight decay 1e-2, no caption dropout, files squashed to 512 x 512
    for config in (plain, eq8):
        assert (config["weight_decay"], config["label_dropout"], config["resize"]) == (1e-2, 0.0, "square")
    assert (probe["weight_decay"], probe["label_dropout"], probe["resize"]) == (0.0, 0.0, "square")


# ---------------------------------------------------------------------------------------------------------------------
# Fig. 2 at SD scale (eval.py innercontrol-sd-curve)
# ---------------------------------------------------------------------------------------------------------------------

def test_the_fig2_curve_command_writes_one_value_per_t_and_model(files, tmp_path):
    unet = UNet(**SD_SIZES["tiny"]["unet"])
    controlnet = randomise(ControlNet.from_unet(unet, hint_downsampling=AUTOENCODERS["tiny"]().downsampling_factor))
    torch.save({"control_model." + key: value for key, value in controlnet.state_dict().items()}, tmp_path / "cn.pth")
    timesteps = [0, 500, 999]
    out = tmp_path / "fig2.json"
    eval_script.main(list(map(str, ["innercontrol-sd-curve", "--probe", files["probe-segmentation"].parent,
                                    "--reward-model", files["segmenter"], "--data-path", files["segmentation"],
                                    "--run", tmp_path / "cn.pth", "--timesteps", ",".join(map(str, timesteps)),
                                    "--num-images", 2, "--device", "cpu", "--out", out])))
    curves = json.loads(out.read_text())["metrics"]["curves"]
    assert list(curves) == ["sd15", "controlnet"]
    for rows in curves.values():
        assert [row["t"] for row in rows] == timesteps
        assert all(0 <= row[reader]["miou"] <= 1 for row in rows for reader in ("probe", "reward"))
    assert curves["sd15"] != curves["controlnet"]  # the ControlNet's residuals change eps, hence x0 and the features
    with Image.open(tmp_path / "fig2.png") as chart:
        assert chart.size == (640, 380)
