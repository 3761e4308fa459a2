"""The InnerControl release's checkpoints here: its align models (train/aggregation_network.py, in the file layout
train/helpers.py:349-365 reads) imported as readout probes, and its ControlNet folders (diffusers save_pretrained, as
train/reward_control_aligned.py:1394-1402, :1919 and :1998-1999 write them) sampled by sample.py sd15. No release
weights exist here: the files are written in the release's layouts at random weights."""
import gzip
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as eval_script  # the script eval.py; named so the builtin eval stays unshadowed
import sample
import train
from ref.checkpoints import read_checkpoint
from ref.hed import HEDAnnotator
from ref.innercontrol_sd import SD_SIZES
from ref.probes import release_align_model, tanh_reading
from ref.safetensors import save_file
from ref.sd_checkpoints import save_diffusers, to_diffusers
from ref.unet import UNet
from tests.helpers import train_error, write_folder
from tests.test_innercontrol_sd import write_sd_file
from tests.test_sd15_sample import MERGES, sd15_state, tiny_networks

torch.set_num_threads(1)
WIDTH = 128  # P: the narrowest projection the release builds (its GroupNorm(32, P/4), aggregation_network.py:56, 169)
TINY_UNET = UNet(**SD_SIZES["tiny"]["unet"])


# ---------------------------------------------------------------------------------------------------------------------
# The release's align model, written and recomputed from its description (aggregation_network.py, helpers.py)
# ---------------------------------------------------------------------------------------------------------------------

def release_align_file(path, dims, sequential=True, seed=0, state_dims=None, **aggregation_kwargs):
    """torch.save of {"step", "config", "aggregation_network", "optimizer_state_dict"} (Readout Guidance's save, read by
    helpers.py:352-365): an AggregationNetwork(feature_dims=dims, projection_dim=WIDTH, save_timestep=[0],
    use_output_head=True, bottleneck_sequential=sequential) state dict at random weights; its keys from
    aggregation_network.py (Conv2d with a .norm GroupNorm, :29-34; blocks wrapped in nn.Sequential, :173-174).
    state_dims: other channels for the weights than the config names. -> path"""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, around=0.0, scale=0.3):
        return around + scale * torch.randn(shape, generator=generator)

    def conv(out, inp, kernel):  # He-like scale, so the tanh head is not saturated
        return rand(out, inp, kernel, kernel, scale=(2 / (inp * kernel * kernel)) ** 0.5)

    state = {}
    for layer, channels in enumerate(state_dims or dims):
        prefix = f"bottleneck_layers.{layer}." + ("0." if sequential else "")
        convs = {"conv1": (WIDTH // 4, channels, 1), "conv2": (WIDTH // 4, WIDTH // 4, 3),
                 "conv3": (WIDTH, WIDTH // 4, 1)}
        if channels != WIDTH:  # :64-74
            convs["shortcut"] = (WIDTH, channels, 1)
        for name, (out, inp, kernel) in convs.items():
            state.update({prefix + f"{name}.weight": conv(out, inp, kernel), prefix + f"{name}.norm.bias": rand(out),
                          prefix + f"{name}.norm.weight": rand(out, around=1.0)})
        state.update({prefix + "emb_layers.weight": rand(WIDTH // 4, 1280, scale=0.03),
                      prefix + "emb_layers.bias": rand(WIDTH // 4)})
    state["mixing_weights"] = rand(len(state_dims or dims), around=1.0)
    for index, (out, inp, kernel) in zip((0, 2, 4), ((128, WIDTH, 3), (32, 128, 3), (3, 32, 1))):  # :196-202
        state.update({f"output_head.{index}.weight": conv(out, inp, kernel),
                      f"output_head.{index}.bias": rand(out)})
    config = dict(dims=list(dims), projection_dim=WIDTH, save_timestep=[0], num_timesteps=1,
                  aggregation_kwargs=dict(dict(use_output_head=True, bottleneck_sequential=sequential),
                                          **aggregation_kwargs))
    torch.save(dict(step=5000, config=config, aggregation_network=state,
                    optimizer_state_dict=dict(state={}, param_groups=[])), path)
    return path


def release_block(weights, x, emb):
    """BottleneckBlock.forward (aggregation_network.py:116-141) on the block's weights by its own names."""
    def conv_norm(name, h, padding=0):  # Conv2d: a bias-free conv, then its GroupNorm(32) (:36-47)
        h = F.conv2d(h, weights[f"{name}.weight"], padding=padding)
        return F.group_norm(h, 32, weights[f"{name}.norm.weight"], weights[f"{name}.norm.bias"])

    out = F.relu(conv_norm("conv1", x))
    if emb is not None:
        out = out + F.relu(F.linear(emb, weights["emb_layers.weight"], weights["emb_layers.bias"]))[:, :, None, None]
    out = conv_norm("conv3", F.relu(conv_norm("conv2", out, padding=1)))
    return F.relu(out + (conv_norm("shortcut", x) if "shortcut.weight" in weights else x))


def release_forward(contents, features, emb):
    """What the release computes from the decoder features: helpers.py:309-334 resizes each map bilinearly to 64 x 64
    and concatenates them on channels; AggregationNetwork.forward (:213-241) cuts the batch by feature_dims, mixes the
    blocks' outputs with softmax(mixing_weights) and runs the output head; a Sequential block is called without emb."""
    config, state = contents["config"], contents["aggregation_network"]
    sequential = config["aggregation_kwargs"]["bottleneck_sequential"]
    batch = torch.cat([F.interpolate(feature, size=(64, 64), mode="bilinear") for feature in features], 1)
    mixing = state["mixing_weights"].softmax(0)
    mixed, start = 0, 0
    for layer, channels in enumerate(config["dims"]):
        prefix = f"bottleneck_layers.{layer}." + ("0." if sequential else "")
        weights = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
        mixed = mixed + mixing[layer] * release_block(weights, batch[:, start:start + channels],
                                                      None if sequential else emb)
        start += channels
    head = [(state[f"output_head.{index}.weight"], state[f"output_head.{index}.bias"]) for index in (0, 2, 4)]
    h = F.silu(F.conv2d(mixed, *head[0], padding=1))
    h = F.silu(F.conv2d(h, *head[1], padding=1))
    return torch.tanh(F.conv2d(h, *head[2]))


@pytest.mark.parametrize("sequential", [True, False])
def test_an_imported_align_model_computes_the_releases_network(sequential, tmp_path):
    dims = [WIDTH, 64, 32]  # the first block has no shortcut (C_l == P)
    path = release_align_file(tmp_path / "depth.pt", dims, sequential)
    contents = read_checkpoint(path)
    probe = release_align_model(contents, path)
    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(2, channels, side, side, generator=generator) for channels, side in zip(dims, (8, 16, 64))]
    emb, other_emb = torch.randn(2, 2, 1280, generator=generator)
    ours = probe(features, emb)
    assert ours.shape == (2, 3, 64, 64) and ours.abs().max() < 1
    torch.testing.assert_close(ours, release_forward(contents, features, emb), atol=1e-5, rtol=1e-5)
    # the sequential variant ignores t; the other reads it through its 1280-d time projection
    assert torch.equal(probe(features, other_emb), ours) == sequential


# ---------------------------------------------------------------------------------------------------------------------
# train.py --config sd15-innercontrol --probe RELEASE_FILE
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    with gzip.open(root / "bpe.txt.gz", "wt", encoding="utf-8") as file:
        file.write("#version: 0.2\nc a\nca t</w>\nt h\nth e</w>\na t</w>\n")
    flags = ["--sd-size", "tiny", "--sd15", write_sd_file(root / "sd.ckpt"), "--tokenizer", root / "bpe.txt.gz",
             "--image-size", 16, "--num-classes", 4, "--workers", 0, "--log-every", 1, "--controlnet-init", "none",
             "--alpha", 0, "--batch-size", 2, "--grad-accumulation", 1]
    return dict(root=root, flags=flags, sd15=root / "sd.ckpt", tokenizer=root / "bpe.txt.gz",
                depth=write_folder(root / "depth", "depth", size=16),
                attn=release_align_file(root / "attn.pt", TINY_UNET.tap_channels("attn")),
                conv=release_align_file(root / "conv.pt", TINY_UNET.tap_channels("conv")))


def innercontrol_argv(files, probe, out, task="depth"):
    return ["--config", "sd15-innercontrol", *files["flags"], "--task", task, "--data-path", files["depth"],
            "--probe", probe, "--out", out]


def test_train_reads_a_release_align_model_on_the_taps_its_channels_name(files, tmp_path):
    for mode in ("attn", "conv"):
        config, _ = train.parse_args(list(map(str, innercontrol_argv(files, files[mode], tmp_path / mode))))
        terms = train.make_run(config).terms
        assert terms.tap_mode == mode and terms.probe.feature_channels == TINY_UNET.tap_channels(mode)
    train.main(list(map(str, innercontrol_argv(files, files["attn"], tmp_path / "run") + ["--steps", 1])))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1 and (tmp_path / "run" / "latest.pt").is_file()


SD15_ATTN = [1280] * 3 + [640] * 3 + [320] * 3  # the release's depth.pt dims: SD1.5's attention taps
WRONG_RELEASE_FILES = {  # name: (write the file, task, what the one error line says)
    "segmentation": (lambda path: release_align_file(path, [64, 64]), "segmentation",
                     "a tanh control map, which the release trains for depth, hed and lineart only"),
    "sd15 taps": (lambda path: release_align_file(path, SD15_ATTN), "depth",
                  f"for feature maps of {SD15_ATTN} channels; this UNet's attn taps have [64, 64], its conv taps"),
    "time embedding": (lambda path: release_align_file(path, [64, 64], sequential=False), "depth",
                       "reads a 1280-d time embedding; this UNet's is 128-d"),
    "no head": (lambda path: release_align_file(path, [64, 64], use_output_head=False), "depth",
                "without its output head (use_output_head False)"),
    "weights": (lambda path: release_align_file(path, [64, 64], state_dims=[64, 32]), "depth",
                "weights do not fit its own config: shape mismatches"),
}


@pytest.mark.parametrize("case", list(WRONG_RELEASE_FILES))
def test_a_release_align_model_that_cannot_serve_is_refused_in_one_line(case, files, tmp_path, capsys):
    write, task, expected = WRONG_RELEASE_FILES[case]
    error = train_error(innercontrol_argv(files, write(tmp_path / "align.pt"), tmp_path / "run", task), capsys)
    assert error.startswith("error: ") and error.count("\n") == 1 and expected in error, error
    assert not (tmp_path / "run").exists()


def test_the_fig2_curve_reads_a_release_align_model_with_the_task_given(files, tmp_path, capsys):
    torch.manual_seed(0)  # D: the HED annotator at random weights, the same whatever ran before
    torch.save(HEDAnnotator().state_dict(), tmp_path / "hed.pth")
    argv = ["innercontrol-sd-curve", "--probe", files["attn"], "--reward-model", tmp_path / "hed.pth", "--data-path",
            write_folder(tmp_path / "hed", "hed", samples=2, size=16), "--sd15", files["sd15"], "--tokenizer",
            files["tokenizer"], "--sd-size", "tiny", "--image-size", 16, "--timesteps", "0,600", "--num-images", 2,
            "--device", "cpu", "--out", tmp_path / "fig2.json"]
    with pytest.raises(SystemExit) as stopped:  # the file names no task
        eval_script.main(list(map(str, argv)))
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.count("\n") == 1 and "names no task: give --task" in error, error
    assert not (tmp_path / "fig2.json").exists()
    eval_script.main(list(map(str, argv + ["--task", "hed"])))
    curves = json.loads((tmp_path / "fig2.json").read_text())["metrics"]["curves"]
    assert [row["t"] for row in curves["sd15"]] == [0, 600]
    assert all(-1 <= row[reader]["ssim"] <= 1 for row in curves["sd15"] for reader in ("probe", "reward"))


# ---------------------------------------------------------------------------------------------------------------------
# The release's ControlNet folders through sample.py sd15 and eval.py innercontrol-sd
# ---------------------------------------------------------------------------------------------------------------------

# ControlNetModel's config.json fields (diffusers' ControlNetModel.__init__) beyond those save_diffusers writes, at
# their defaults, and what EMAModel.save_pretrained adds to its copy's config (diffusers training_utils.py).
CONTROLNET_FIELDS = dict(
    _diffusers_version="0.25.0", mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
    downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", norm_eps=1e-5, transformer_layers_per_block=1,
    encoder_hid_dim=None, encoder_hid_dim_type=None, num_attention_heads=None, class_embed_type=None,
    addition_embed_type=None, addition_time_embed_dim=None, num_class_embeds=None, upcast_attention=False,
    resnet_time_scale_shift="default", projection_class_embeddings_input_dim=None,
    controlnet_conditioning_channel_order="rgb", global_pool_conditions=False, addition_embed_type_num_heads=64)
EMA_FIELDS = dict(decay=0.9999, min_decay=0.0, optimization_step=2, update_after_step=0, use_ema_warmup=False,
                  inv_gamma=1.0, power=2 / 3)


def release_controlnet_folder(controlnet, folder, ema=False):
    """ControlNetModel.save_pretrained's folder: config.json with the published fields, the weights as safetensors."""
    save_diffusers(controlnet, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(CONTROLNET_FIELDS, **(EMA_FIELDS if ema else {}))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def test_the_releases_controlnet_folders_sample_as_the_same_weights_in_ldm_layout(tmp_path):
    """output_dir/ and output_dir_ema/ (:1998-1999), checkpoint-N/ with controlnet/ and controlnet_ema/ beside
    accelerate's files (:1394-1402, :1916-1919), and the FSDP state dict controlnet_state_dict.pt (:1992) all sample
    what the ControlNet 1.1 file of the same weights samples; eval.py innercontrol-sd scores them."""
    unet, controlnet, text_encoder, autoencoder = tiny_networks()
    _, other_controlnet, _, _ = tiny_networks()
    torch.manual_seed(7)
    for parameter in other_controlnet.parameters():  # the non-EMA weights: something else than the EMA's
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    save_file(sd15_state(unet, text_encoder, autoencoder), tmp_path / "sd15.safetensors")
    torch.save({"control_model." + k: v for k, v in controlnet.state_dict().items()}, tmp_path / "control.pth")
    with gzip.open(tmp_path / "vocab.txt.gz", "wt", encoding="utf-8") as file:
        file.write("\n".join(["#version: 0.2", *MERGES]) + "\n")
    run = tmp_path / "work_dirs" / "depth_reward_aligned"
    release_controlnet_folder(controlnet, run.with_name(run.name + "_ema"), ema=True)
    release_controlnet_folder(controlnet, run / "checkpoint-2" / "controlnet_ema", ema=True)
    release_controlnet_folder(other_controlnet, run / "checkpoint-2" / "controlnet")
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):  # accelerate's state, not read
        (run / "checkpoint-2" / name).write_bytes(b"\x80\x04N.")
    torch.save(to_diffusers(controlnet.state_dict(), 1), tmp_path / "controlnet_state_dict.pt")
    data = write_folder(tmp_path / "data", "segmentation", samples=2, size=32)

    def samples(controlnet_path, name):
        sample.main(list(map(str, ["sd15", "--architecture", "tiny", "--sd15", tmp_path / "sd15.safetensors",
                                   "--controlnet", controlnet_path, "--tokenizer", tmp_path / "vocab.txt.gz",
                                   "--data-path", data, "--task", "segmentation", "--size", 32, "--steps", 2,
                                   "--out", tmp_path / name])))
        return np.load(tmp_path / name / "samples.npz")["arr_0"]

    expected = samples(tmp_path / "control.pth", "ldm")
    for name, path in {"ema": run.with_name(run.name + "_ema"), "checkpoint": run / "checkpoint-2",
                       "fsdp": tmp_path / "controlnet_state_dict.pt"}.items():
        assert np.array_equal(samples(path, name), expected), name
    assert not np.array_equal(samples(run / "checkpoint-2" / "controlnet", "non-ema"), expected)
    torch.jit.script(torch.nn.Conv2d(3, 4, 1)).save(str(tmp_path / "segmenter.pt"))
    metrics = eval_script.main(list(map(str, ["innercontrol-sd", "--samples", tmp_path / "checkpoint", "--data-path",
                                              data, "--task", "segmentation", "--eval-model",
                                              tmp_path / "segmenter.pt", "--num-classes", 4, "--device", "cpu"])))
    assert 0 <= metrics["miou"] <= 1 and metrics["samples"] == 2


def test_a_three_channel_tanh_map_is_read_as_its_channel_mean_against_a_one_channel_control():
    estimate = torch.tensor([-1.0, 0.0, 0.5]).reshape(1, 3, 1, 1).expand(2, 3, 4, 4)  # read as 0, 0.5, 0.75
    assert torch.equal(tanh_reading(estimate, 1), torch.full((2, 1, 4, 4), 1.25 / 3))
    assert torch.equal(tanh_reading(estimate, 3), (estimate + 1) / 2)  # as many channels as the control: each its own
