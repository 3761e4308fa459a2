"""InnerControl at SD scale (ref/innercontrol_sd.py, ref/control_data.py) on tiny SD-layout parts written to files in
the test (an SD single file, a BPE vocabulary, a TorchScript segmenter, data folders): the data's crop and its errors
naming the line; gradients reach the ControlNet from the reward (through the VAE decoder) and the alignment terms and
nothing frozen, out-of-range samples add nothing; gradient accumulation gives the gradient of the whole batch; a 2-step
Eq. 8 run via train.main resumed after --stop-after is bitwise the uninterrupted one, and the next stage starts from its
EMA weights; the probe run trains and its loss falls on one overfitted batch."""
import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

import train
from ref.clip import MODELS as TEXT_ENCODERS
from ref.control_data import ControlDataset
from ref.checkpoints import read_checkpoint
from ref.innercontrol_sd import SD_CONFIGS, SD_SIZES
from ref.runtime import Distributed, SampleDraws
from ref.trainer import accumulate_gradients
from ref.unet import UNet
from ref.vae import MODELS as AUTOENCODERS
from tests.helpers import assert_same_state, train_error

torch.set_num_threads(1)
SIZE = 16  # training resolution: 4 x 4 latents of the tiny f4 VAE
CLASSES = 4
SEED_IMAGES = np.random.default_rng(0)


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


def write_image(path, pixels, mode=None):
    Image.fromarray(pixels, mode).save(path) if mode else Image.fromarray(pixels).save(path)
    return path.name


def write_folder(folder, task, samples=4, width=SIZE + 4, height=SIZE):
    """`samples` lines of random images with controls of the task's kind, width x height pixels."""
    folder.mkdir()
    lines = []
    for index in range(samples):
        line = dict(image=write_image(folder / f"image{index}.png",
                                      SEED_IMAGES.integers(0, 256, (height, width, 3), dtype=np.uint8)),
                    caption=["a cat", "the cat", "", "a tat"][index % 4])
        if task == "segmentation":
            labels = SEED_IMAGES.integers(0, CLASSES, (height, width), dtype=np.uint8)
            labels[0] = 255
            line["control"] = write_image(folder / f"labels{index}.png", labels)
            line["hint"] = write_image(folder / f"hint{index}.png",
                                       SEED_IMAGES.integers(0, 256, (height, width, 3), dtype=np.uint8))
        else:
            blocks = SEED_IMAGES.integers(0, 256, (height // 4, width // 4), dtype=np.uint8)  # what 4 x 4 latents hold
            line["control"] = write_image(folder / f"depth{index}.png", np.kron(blocks, np.ones((4, 4), np.uint8)))
        lines.append(json.dumps(line))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


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
                 segmentation=write_folder(root / "segmentation", "segmentation"),
                 depth=write_folder(root / "depth", "depth"))
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
    folder = write_folder(tmp_path / "seg", "segmentation", samples=1)
    image, hint, labels, caption = ControlDataset(folder, "segmentation", SIZE)[0]
    record = json.loads((folder / "metadata.jsonl").read_text())
    source = {key: np.asarray(Image.open(folder / record[key])) for key in ("image", "control", "hint")}
    crop = {key: torch.from_numpy(pixels[:, 2:18].astype(np.float32)) for key, pixels in source.items()}
    assert torch.equal(image, crop["image"].permute(2, 0, 1) / 127.5 - 1)
    assert torch.equal(labels, crop["control"].long())
    assert torch.equal(hint, crop["hint"].permute(2, 0, 1) / 255)
    assert caption == "a cat"
    big = write_folder(tmp_path / "big", "segmentation", samples=1, width=40, height=32)
    labels = ControlDataset(big, "segmentation", SIZE)[0][2]
    assert labels.shape == (SIZE, SIZE) and set(labels.unique().tolist()) <= {0, 1, 2, 3, 255}
    depth = write_folder(tmp_path / "depth", "depth", samples=1)
    _, hint, control, _ = ControlDataset(depth, "depth", SIZE)[0]
    grey = np.asarray(Image.open(depth / "depth0.png"))[:, 2:18].astype(np.float32) / 255
    assert torch.allclose(control[0], torch.from_numpy(grey), atol=1e-6)
    assert torch.equal(hint, control.expand(3, -1, -1))


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
    folder = write_folder(tmp_path / "seg", "segmentation", samples=2)
    change, message = BAD_LINES[case]
    edit_first_line(folder, change)
    with pytest.raises(ValueError, match=message):
        ControlDataset(folder, "segmentation", SIZE)[0]


def test_a_colour_depth_map_stops_train_with_one_error_line(files, tmp_path, capsys):
    folder = write_folder(tmp_path / "depth", "depth", samples=2)
    edit_first_line(folder, lambda r: json.dumps(dict(r, control=r["image"])))
    error = train_error(["--config", "sd15-probe", *files["flags"], "--task", "depth", "--data-path", folder,
                         "--probe-resolution", 4, "--probe-width", 16, "--out", tmp_path / "out"], capsys)
    assert error.count("\n") == 1 and "line 1: control" in error and "expected a grey depth map" in error
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The Eq. 8 step
# ---------------------------------------------------------------------------------------------------------------------

def controlnet_gradients(config, seed=0):
    """The run's ControlNet gradient on its first 4 samples (all draws fixed), and the run."""
    run = train.make_run(config)
    torch.manual_seed(seed)
    net = run.build()
    batch = run.collate([run.make_dataset()[index] for index in range(4)])
    run.loss(net, batch, SampleDraws(range(4)), torch.device("cpu")).mean().backward()
    return torch.cat([p.grad.flatten() for p in net.parameters()]), run


def test_gradients_reach_the_controlnet_from_both_terms_and_nothing_frozen(files):
    everything = dict(reward_range="0,999", align_range="0,999")
    diffusion, _ = controlnet_gradients(controlnet_config(files, alpha=0, beta=0))
    with_reward, run = controlnet_gradients(controlnet_config(files, alpha=1, beta=0, **everything))
    with_alignment, _ = controlnet_gradients(controlnet_config(files, alpha=0, beta=1, **everything))
    assert (with_reward - diffusion).abs().max() > 1e-6 and (with_alignment - diffusion).abs().max() > 1e-6
    _, run = controlnet_gradients(controlnet_config(files, alpha=1, beta=1, **everything))
    frozen = [run.base.unet, run.base.vae, run.base.text_encoder, run.terms.probe, run.terms.reward_model]
    for network in frozen:
        assert all(not p.requires_grad and p.grad is None for p in network.parameters())


def test_out_of_range_samples_add_nothing(files):
    """Ranges that hold none of the drawn steps leave the plain diffusion gradient, bitwise."""
    diffusion, _ = controlnet_gradients(controlnet_config(files, alpha=0, beta=0))
    draws = SampleDraws(range(4))
    _ = draws.rand(1), draws.randn(4, 4, 4)  # caption dropout, posterior noise: then t
    low = int(draws.randint(1000).min())
    outside, _ = controlnet_gradients(controlnet_config(files, alpha=1, beta=1, reward_range=f"0,{low - 1}",
                                                       align_range=f"0,{low - 1}"))
    assert torch.equal(outside, diffusion)


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
                         files["depth"], "--batch-size", 4, "--grad-accumulation", 3, "--out", tmp_path / "out"], capsys)
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


def test_lineart_has_no_reward_model(files, tmp_path, capsys):
    error = train_error(["--config", "sd15-innercontrol", *files["flags"], "--task", "lineart", "--data-path",
                         files["depth"], "--beta", "0", "--out", tmp_path], capsys)
    assert "no lineart reward model; train the lineart ControlNet with --alpha 0" in error


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
