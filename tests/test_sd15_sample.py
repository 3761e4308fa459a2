"""`sample.py sd15`: SD1.5 + ControlNet text-to-image on tiny random networks of the SD layout written to files (an
SD1.5 single file, a ControlNet 1.1 .pth, a hand-made CLIP vocabulary): SD's leading timesteps and last DDIM step
against independent derivations, CFG's single branch at weight 1, the outputs, the same images at any batch size, and
bad input (SD2 / SDXL files, a ControlNet of another width, a wrong vocabulary, count mismatches, missing files)."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script  # the script eval.py; named so the builtin eval stays unshadowed
import sample
from ref import runtime, text_to_image, vae
from ref.control_data import ControlDataset
from ref.safetensors import save_file
from ref.sd_checkpoints import save_diffusers
from ref.samplers import ddim, leading_timesteps
from ref.schedules import DDPMSchedule
from ref.tokenizer import CLIPTokenizer, clip_vocabulary
from tests.helpers import (CONFIGS_BY_FOLDER, randomise, tiny_sd_networks, write_diffusers_folders, write_folder,
                           write_image, write_tokenizer_json)

torch.set_num_threads(1)

MERGES = ["a </w>", "c a", "ca t</w>", "d o", "do g</w>"]
PROMPTS = ["a cat", "a dog", "cat and dog"]


def tiny_networks(**unet_overrides):
    builds = text_to_image.ARCHITECTURES["tiny"]
    return [randomise(builds[name](**(unet_overrides if name in ("unet", "controlnet") else {})), seed)
            for seed, name in enumerate(("unet", "controlnet", "text_encoder", "autoencoder"))]


def sd15_state(unet, text_encoder, autoencoder):
    """An SD1.5 single file's keys: model.diffusion_model.*, cond_stage_model.transformer.*, first_stage_model.*"""
    return {**{"model.diffusion_model." + k: v for k, v in unet.state_dict().items()},
            **{"cond_stage_model.transformer." + k: v for k, v in text_encoder.state_dict().items()},
            **{"first_stage_model." + k: v for k, v in autoencoder.state_dict().items()}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny SD1.5 file, ControlNet file, vocabulary, 3 prompts and 3 control images (one of another size)."""
    root = tmp_path_factory.mktemp("sd15")
    unet, controlnet, text_encoder, autoencoder = tiny_networks()
    save_file(sd15_state(unet, text_encoder, autoencoder), root / "sd15.safetensors")
    torch.save({"control_model." + k: v for k, v in controlnet.state_dict().items()}, root / "control.pth")
    with gzip.open(root / "vocab.txt.gz", "wt", encoding="utf-8") as file:
        file.write("\n".join(["#version: 0.2", *MERGES]) + "\n")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    controls = root / "controls"
    controls.mkdir()
    generator = np.random.default_rng(0)
    for index, side in enumerate((64, 64, 48)):
        Image.fromarray(generator.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(controls / f"{index}.png")
    return root


def sd15_argv(files, out, *extra):
    return ["sd15", "--architecture", "tiny", "--sd15", files / "sd15.safetensors", "--controlnet",
            files / "control.pth", "--tokenizer", files / "vocab.txt.gz", "--prompts", files / "prompts.txt",
            "--controls", files / "controls", "--size", "64", "--steps", "3", "--out", out, *extra]


def run_sd15(argv):
    sample.main(list(map(str, argv)))


# ---------------------------------------------------------------------------------------------------------------------
# The sampler: SD's leading timesteps and the last step to abar_0
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [50, 20, 7])
def test_leading_timesteps_are_every_stride_th_step_from_the_offset_down(steps):
    stride = 1000 // steps  # diffusers' step_ratio
    expected = sorted((t for t in range(1, 1000) if (t - 1) % stride == 0 and (t - 1) // stride < steps),
                      reverse=True)
    assert leading_timesteps(1000, steps).tolist() == expected
    if steps == 50:
        assert expected[:3] == [981, 961, 941] and expected[-1] == 1


def test_leading_timesteps_past_the_last_training_step_are_refused():
    assert leading_timesteps(1000, 999).tolist()[:2] == [999, 998]  # stride 1: 998 * 1 + 1
    with pytest.raises(ValueError, match="do not fit"):
        leading_timesteps(1000, 1000)  # 999 * 1 + 1 = 1000 is no training step


def test_ddim_ends_at_abar_0_of_the_exact_path_with_sd_final_alpha():
    """Data concentrated at one point x*: the exact eps keeps a DDIM (eta 0) path on x_t = sqrt(abar_t) x* +
    sqrt(1 - abar_t) z, so the last step lands on sqrt(abar_0) x* + sqrt(1 - abar_0) z (set_alpha_to_one False),
    or on x* with the default final abar 1."""
    schedule = DDPMSchedule.named("scaled_linear")
    target, z = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)

    def exact_eps(x, t):
        abar = schedule.abar(t.long())[:, None, None, None]
        return (x - abar.sqrt() * target) / (1 - abar).sqrt()

    timesteps = leading_timesteps(1000, 10)
    start = schedule.abar(timesteps[0])
    noise = start.sqrt() * target + (1 - start).sqrt() * z
    abar0 = schedule.abar(0)
    sd = ddim(exact_eps, noise, schedule, timesteps, model_dtype=torch.float64, final_abar=abar0)
    assert torch.allclose(sd, abar0.sqrt() * target + (1 - abar0).sqrt() * z, atol=1e-10)
    assert torch.allclose(ddim(exact_eps, noise, schedule, timesteps, model_dtype=torch.float64), target, atol=1e-10)


def test_cfg_weight_one_runs_the_text_branch_alone_and_otherwise_both():
    unet, controlnet, text_encoder, autoencoder = tiny_networks()
    networks = text_to_image.Networks(unet.eval(), controlnet.eval(), text_encoder.eval(), autoencoder.eval())
    rows = []
    unet.register_forward_pre_hook(lambda module, inputs: rows.append(len(inputs[0])))
    context, null = torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    hint, noise = torch.rand(2, 3, 64, 64), torch.randn(2, 4, 8, 8)
    single = text_to_image.generate(networks, context, null, hint, noise, steps=3, cfg_scale=1.0)
    assert rows == [2, 2, 2]
    rows.clear()
    guided = text_to_image.generate(networks, context, null, hint, noise, steps=3, cfg_scale=3.0)
    assert rows == [4, 4, 4]
    same_null = text_to_image.generate(networks, context[:1], context[:1], hint[:1], noise[:1], steps=3, cfg_scale=3.0)
    assert not torch.allclose(single, guided)
    assert torch.allclose(same_null, single[:1], atol=1e-5)  # text = null: the guided eps is the text eps


def test_the_control_scale_multiplies_the_controlnet_residuals():
    """Scale 0: the control image has no effect; scale 1 and 2 differ, as do two controls at scale 1."""
    networks = text_to_image.Networks(*(network.eval() for network in tiny_networks()))
    context, noise = torch.randn(1, 77, 32), torch.randn(1, 4, 8, 8)
    hints = torch.rand(2, 1, 3, 64, 64)

    def images(hint, scale):
        return text_to_image.generate(networks, context, context, hint, noise, steps=2, cfg_scale=1.0,
                                      control_scale=scale)
    assert torch.equal(images(hints[0], 0.0), images(hints[1], 0.0))
    assert not torch.allclose(images(hints[0], 1.0), images(hints[1], 1.0))
    assert not torch.allclose(images(hints[0], 1.0), images(hints[0], 2.0))


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------

def test_sd15_writes_samples_grid_settings_and_pngs(files, tmp_path, capsys):
    out = tmp_path / "out"
    run_sd15(sd15_argv(files, out, "--seeds-per-prompt", "2", "--png", "--cfg", "5"))
    err = capsys.readouterr().err
    assert "controls/2.png is 48x48; resized to 64x64" in err
    with np.load(out / "samples.npz") as npz:
        images, pairs = npz["arr_0"], npz["arr_1"]
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 0
    assert pairs.tolist() == [0, 0, 1, 1, 2, 2]
    assert Image.open(out / "grid.png").size == (3 * 64, 3 * 64)  # control + 2 samples, 3 rows
    settings = json.loads((out / "settings.json").read_text())
    assert settings["network_evaluations_per_sample"] == 6 and settings["pairs"][1]["prompt"] == "a dog"
    assert np.array_equal(np.asarray(Image.open(out / "images" / "00001_1.png")), images[3])
    assert len(list((out / "images").iterdir())) == 6  # one PNG a sample, named by pair and seed


def test_data_path_samples_its_captions_with_the_training_hints_and_eval_scores_them(files, tmp_path):
    """--data-path FOLDER --task segmentation: the same images as --prompts PAIRS.jsonl of the captions and the hints
    cut as training cuts them (written as files); the grid shows those hints; eval.py innercontrol-sd reads it all."""
    data = write_folder(tmp_path / "data", "segmentation", samples=2, size=32)
    hints = [text_to_image.hint_picture(item[1]) for item in ControlDataset(data, "segmentation", 32)]
    lines = [json.dumps(dict(prompt=caption, control=write_image(tmp_path / f"hint{index}.png", hint)))
             for index, (caption, hint) in enumerate(zip(["a cat", "the cat"], hints))]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    common = ["sd15", "--architecture", "tiny", "--sd15", files / "sd15.safetensors", "--controlnet",
              files / "control.pth", "--tokenizer", files / "vocab.txt.gz", "--size", 32, "--steps", 2,
              "--seeds-per-prompt", 2]
    run_sd15([*common, "--data-path", data, "--task", "segmentation", "--out", tmp_path / "data-out"])
    run_sd15([*common, "--prompts", tmp_path / "pairs.jsonl", "--out", tmp_path / "pairs-out"])
    from_data, from_pairs = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("data-out", "pairs-out"))
    assert np.array_equal(from_data, from_pairs)
    settings = json.loads((tmp_path / "data-out" / "settings.json").read_text())
    assert [pair["prompt"] for pair in settings["pairs"]] == ["a cat", "the cat"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "data-out" / "grid.png"))[:32, :32], hints[0])
    torch.jit.script(torch.nn.Conv2d(3, 4, 1)).save(str(tmp_path / "segmenter.pt"))
    metrics = eval_script.main(list(map(str, ["innercontrol-sd", "--samples", tmp_path / "data-out", "--data-path",
                                              data, "--task", "segmentation", "--eval-model",
                                              tmp_path / "segmenter.pt", "--num-classes", 4, "--device", "cpu"])))
    assert len(metrics["per_seed"]) == 2 and 0 <= metrics["miou"] <= 1 and metrics["samples"] == 4


def test_the_same_seeds_give_the_same_images_at_batch_1_and_3_and_on_2_ranks(files, tmp_path):
    for batch in (1, 3):
        run_sd15(sd15_argv(files, tmp_path / f"b{batch}", "--batch-size", batch, "--seeds-per-prompt", "2"))
    one, three = (np.load(tmp_path / f"b{batch}" / "samples.npz")["arr_0"].astype(int) for batch in (1, 3))
    args = sample.parse_sd15_args(list(map(str, sd15_argv(files, tmp_path / "r2", "--batch-size", 2,
                                                          "--seeds-per-prompt", 2)[1:])))
    pairs, hints, tokenizer, networks = sample.load_sd15_inputs(args)
    shares = [text_to_image.sd15_share(args, networks, hints, tokenizer([prompt for prompt, _ in pairs]),
                                       tokenizer([""]), runtime.Distributed(rank, 2, torch.device("cpu")))
              for rank in (0, 1)]
    assert [indices.tolist() for indices, _ in shares] == [[0, 2, 4], [1, 3, 5]]  # rank r: r, r + W, ..
    ranks = np.empty_like(one)
    for indices, images in shares:
        ranks[indices] = images
    for other in (three, ranks):
        assert np.abs(one - other).max() <= 1 and (one == other).mean() > 0.999  # float rounding across row counts
    assert not np.array_equal(one[0], one[1])  # the two seeds of a prompt differ


def test_a_diffusers_pipeline_folder_loads_the_same_networks_as_the_single_file(files, tmp_path):
    """unet/ and vae/ in the diffusers layout, text_encoder/ as transformers publishes it (text_model.*)."""
    unet, _, text_encoder, autoencoder = tiny_networks()
    save_diffusers(unet, tmp_path / "pipeline" / "unet")
    (tmp_path / "pipeline" / "vae").mkdir()
    save_file(vae.to_diffusers(autoencoder.state_dict(), len(autoencoder.encoder.down)),
              tmp_path / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "pipeline" / "text_encoder").mkdir()
    save_file(text_encoder.state_dict(), tmp_path / "pipeline" / "text_encoder" / "model.safetensors")
    from_folder, from_file = (text_to_image.load_networks("tiny", path, files / "control.pth")
                              for path in (tmp_path / "pipeline", files / "sd15.safetensors"))
    for name in ("unet", "text_encoder", "autoencoder"):
        ours, theirs = getattr(from_folder, name).state_dict(), getattr(from_file, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    (tmp_path / "pipeline" / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "pipeline" / "vae").rmdir()
    with pytest.raises(ValueError, match="no vae model folder"):
        text_to_image.load_networks("tiny", tmp_path / "pipeline", files / "control.pth")


def test_long_prompts_are_cut_with_a_warning_naming_them(files, tmp_path, capsys):
    long_prompt = "a dog " + "cat " * 100
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(prompt=long_prompt, control="0.png")) + "\n")
    argv = sd15_argv(files, tmp_path / "out", "--controlnet-plus-plus")
    argv[argv.index("--prompts") + 1] = tmp_path / "pairs.jsonl"
    with pytest.raises(SystemExit):  # the protocol at 512 px is slow here: its refusal of --size 64 instead
        run_sd15(argv)
    assert "--controlnet-plus-plus fixes --size 512, got 64" in capsys.readouterr().err
    argv.remove("--controlnet-plus-plus")
    run_sd15(argv)
    err = capsys.readouterr().err
    assert "warning: prompt 'a dog cat cat" in err and "truncated" in err


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one error line, exit status 2, nothing written
# ---------------------------------------------------------------------------------------------------------------------

def sd2_file(path):
    """SD2's layout: an OpenCLIP text encoder (cond_stage_model.model.*) and 1024-wide cross-attention context."""
    unet, _, text_encoder, autoencoder = tiny_networks(context_dim=48)
    state = sd15_state(unet, text_encoder, autoencoder)
    state = {key.replace("cond_stage_model.transformer.", "cond_stage_model.model."): v for key, v in state.items()}
    save_file(state, path)


def sdxl_file(path):
    unet, _, text_encoder, autoencoder = tiny_networks()
    state = sd15_state(unet, text_encoder, autoencoder)
    state["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(32)
    state["model.diffusion_model.label_emb.0.0.weight"] = torch.ones(128, 256)
    save_file(state, path)


def wide_controlnet_file(path):
    controlnet = tiny_networks(model_channels=64)[1]
    torch.save({"control_model." + k: v for k, v in controlnet.state_dict().items()}, path)


def far_ids_vocabulary(folder):
    """vocab.json + merges.txt whose ids run past the text encoder's 49408 embeddings: CLIP's numbering of MERGES
    (2 x 256 byte symbols, 5 merges, 2 special tokens: ids 0 .. 518) shifted by 49000."""
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({k: v + 49000 for k, v in clip_vocabulary(
        [tuple(m.split()) for m in MERGES]).items()}))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *MERGES]) + "\n")


# case: (flag, its value ({files}: the fixture's folder, {tmp}: the test's), a function writing that file or None,
# what the error says)
BAD_INPUTS = {
    "sd2": ("--sd15", "{tmp}/sd2.safetensors", sd2_file, "an OpenCLIP text encoder, SD2's"),
    "sdxl": ("--sd15", "{tmp}/sdxl.safetensors", sdxl_file, "SDXL's text encoders"),
    "controlnet-width": ("--controlnet", "{tmp}/wide.pth", wide_controlnet_file, "ControlNet file: checkpoint is not "
                         "for this ControlNet (model_channels 32"),
    "sd15-as-controlnet": ("--controlnet", "{files}/sd15.safetensors", None, "ControlNet file: not a ControlNet: no "
                           "hint encoder (control_model.input_hint_block.* or controlnet_cond_embedding.*); the "
                           "file's keys start with cond_stage_model, first_stage_model, model"),
    "vocabulary-kind": ("--tokenizer", "{files}/prompts.txt", None, "expected bpe_simple_vocab_16e6.txt.gz"),
    "vocabulary-ids": ("--tokenizer", "{tmp}/tokenizer", far_ids_vocabulary, "ids up to 49518; the text encoder "
                       "embeds 49408 tokens"),
    "count": ("--prompts", "{tmp}/two.txt", lambda path: path.write_text("one\ntwo\n"), "holds 2 prompts, "),
    "steps": ("--steps", "1000", None, "1000 leading steps with offset 1 do not fit in 1000 timesteps"),
    "size": ("--size", "72", None, "the image size must be a positive multiple of 16"),
    "missing-sd15": ("--sd15", "{tmp}/absent.safetensors", None, "no such file: --sd15"),
    "missing-control": ("--prompts", "{tmp}/pairs.jsonl",
                        lambda path: path.write_text('{"prompt": "a", "control": "absent.png"}\n'),
                        "control images missing: "),
    "missing-prompts": ("--prompts", "{tmp}/absent.txt", None, "no such file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(case, files, tmp_path, capsys):
    flag, value, make, message = BAD_INPUTS[case]
    value = value.format(files=files, tmp=tmp_path)
    if make is not None:
        make(Path(value))
    argv = sd15_argv(files, tmp_path / "out")
    argv[argv.index(flag) + 1] = value
    with pytest.raises(SystemExit) as exit_info:
        run_sd15(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# UniPC, the negative prompt and the releases' evaluation preset
# ---------------------------------------------------------------------------------------------------------------------

def test_unipc_samples_over_its_linspace_timesteps_and_differs_from_ddim(files, tmp_path):
    for sampler in ("unipc", "ddim"):
        run_sd15(sd15_argv(files, tmp_path / sampler, "--sampler", sampler, "--cfg", "3"))
    settings = json.loads((tmp_path / "unipc" / "settings.json").read_text())
    assert settings["sampler"] == "unipc" and settings["timesteps"] == [999, 666, 333]  # round(k * 333), k = 3, 2, 1
    assert settings["network_evaluations_per_sample"] == 6 and settings["final_abar"] == 1.0
    unipc_images, ddim_images = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("unipc", "ddim"))
    assert unipc_images.shape == ddim_images.shape == (3, 64, 64, 3)
    assert np.abs(unipc_images.astype(int) - ddim_images).mean() > 1


def test_the_negative_prompt_s_tokens_are_cfg_s_unconditional_branch(files, tmp_path, monkeypatch):
    """sample.py hands sd15_share the tokens of --negative-prompt (default: the empty prompt) as CFG's null branch;
    test_cfg_weight_one_runs_the_text_branch_alone_and_otherwise_both checks that branch's effect."""
    null_tokens, share = [], text_to_image.sd15_share

    def recorded_share(settings, networks, hints, tokens, null, world):
        null_tokens.append(null)
        return share(settings, networks, hints, tokens, null, world)
    monkeypatch.setattr(text_to_image, "sd15_share", recorded_share)
    run_sd15(sd15_argv(files, tmp_path / "negative", "--steps", "1", "--negative-prompt", "a cat"))
    run_sd15(sd15_argv(files, tmp_path / "empty", "--steps", "1"))
    tokenizer = CLIPTokenizer.from_path(files / "vocab.txt.gz")
    assert torch.equal(null_tokens[0], tokenizer(["a cat"])) and torch.equal(null_tokens[1], tokenizer([""]))
    assert not torch.equal(null_tokens[0], null_tokens[1])
    assert json.loads((tmp_path / "negative" / "settings.json").read_text())["negative_prompt"] == "a cat"


def test_the_releases_evaluation_preset_runs_end_to_end(files, tmp_path, monkeypatch):
    """--controlnet-plus-plus: UniPC 20 steps, CFG 7.5, the negative prompt, 4 images a prompt from seed 42 + i,
    512 px (run at 64 px here: 512 px takes minutes on the tiny networks); --sampler ddim takes 50 steps."""
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(prompt="a cat", control=str(files / "controls" / "0.png")))
                                          + "\n")
    common = ["sd15", "--architecture", "tiny", "--sd15", files / "sd15.safetensors", "--controlnet",
              files / "control.pth", "--tokenizer", files / "vocab.txt.gz", "--prompts", tmp_path / "pairs.jsonl"]
    args = sample.parse_sd15_args(list(map(str, [*common[1:], "--controlnet-plus-plus", "--sampler", "ddim"])))
    sample.resolve_sd15_settings(args)
    assert (args.sampler, args.steps, args.seed, args.size) == ("ddim", 50, 42, 512)
    monkeypatch.setitem(sample.CONTROLNET_PLUS_PLUS, "size", 64)
    run_sd15([*common, "--controlnet-plus-plus", "--out", tmp_path / "preset"])
    settings = json.loads((tmp_path / "preset" / "settings.json").read_text())
    assert {key: settings[key] for key in ("sampler", "steps", "cfg", "negative_prompt", "seed", "seeds_per_prompt",
                                           "size", "num_samples")} == dict(
        sampler="unipc", steps=20, cfg=7.5, negative_prompt="worst quality, low quality", seed=42, seeds_per_prompt=4,
        size=64, num_samples=4)
    assert settings["timesteps"] == text_to_image.sampling_timesteps(20, "unipc").tolist()
    with np.load(tmp_path / "preset" / "samples.npz") as npz:
        images = npz["arr_0"]
        assert images.shape == (4, 64, 64, 3) and npz["arr_1"].tolist() == [0, 0, 0, 0]
    run_sd15([*common, "--sampler", "unipc", "--seed", "44", "--negative-prompt",
              "worst quality, low quality", "--size", "64", "--out", tmp_path / "flags"])
    alone = np.load(tmp_path / "flags" / "samples.npz")["arr_0"][0].astype(int)  # seed 44 = 42 + 2: image 2
    assert np.abs(alone - images[2]).max() <= 1 and np.abs(alone - images[1]).mean() > 1  # float rounding by rows


def without(argv, *flags):
    """argv less each flag and its value."""
    drop = {index + offset for index, item in enumerate(argv) if item in flags for offset in (0, 1)}
    return [item for index, item in enumerate(argv) if index not in drop]


@pytest.mark.parametrize("extra, dropped, message", [
    (("--sampler", "unipc", "--steps", "1000"), ("--steps",),
     "1000 linspace steps do not fit in 1000 timesteps (1 .. 999)"),
    (("--controlnet-plus-plus", "--sampler", "ddim", "--steps", "20"), ("--steps", "--size"),
     "--controlnet-plus-plus fixes --steps 50 for --sampler ddim, got 20"),
    (("--controlnet-plus-plus", "--negative-prompt", ""), ("--steps", "--size"),
     "--controlnet-plus-plus fixes --negative-prompt 'worst quality, low quality', got ''"),
], ids=["unipc-steps", "preset-ddim-steps", "preset-negative-prompt"])
def test_bad_sampler_settings_exit_2_with_one_error_line(extra, dropped, message, files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_sd15([*without(sd15_argv(files, tmp_path / "out"), *dropped), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Diffusers folders: built from their config.json, an fp16 variant, tokenizer.json; clip skip
# ---------------------------------------------------------------------------------------------------------------------

def set_flag(argv, flag, value):
    """argv with `flag` set to `value` (replaced when present)."""
    if flag in argv:
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


@pytest.fixture(scope="module")
def diffusers_files(files, tmp_path_factory):
    """The tiny networks (values float16 holds) as diffusers folders with the fp16 variant and tokenizer.json, and as
    an SD1.5 single file and ControlNet 1.1 file."""
    root = tmp_path_factory.mktemp("diffusers")
    networks = tiny_sd_networks()
    write_diffusers_folders(root, networks, "fp16 variant")
    save_file(sd15_state(networks.unet, networks.text_encoder, networks.autoencoder), root / "sd15.safetensors")
    torch.save({"control_model." + k: v for k, v in networks.controlnet.state_dict().items()}, root / "control.pth")
    write_tokenizer_json(root / "tokenizer", clip_vocabulary([tuple(m.split()) for m in MERGES]), MERGES)
    (root / "pair.jsonl").write_text(json.dumps(dict(prompt="a cat", control=str(files / "controls" / "0.png"))))
    return root


def folder_argv(files, diffusers_files, out, *extra):
    """sample.py sd15 on the diffusers folders, the default architecture (sd15: the configs, not it, build them)."""
    argv = sd15_argv(files, out, "--variant", "fp16", *extra)
    for flag, value in (("--architecture", "sd15"), ("--sd15", diffusers_files / "sd"), ("--controlnet",
                        diffusers_files / "controlnet"), ("--tokenizer", diffusers_files / "tokenizer")):
        argv = set_flag(argv, flag, value)
    return argv


def test_diffusers_folders_with_a_variant_and_tokenizer_json_sample_as_the_single_files(files, diffusers_files,
                                                                                      tmp_path):
    one_pair = ("--prompts", diffusers_files / "pair.jsonl", "--seeds-per-prompt", "2")
    run_sd15(folder_argv(files, diffusers_files, tmp_path / "folders", *one_pair))
    single = set_flag(sd15_argv(files, tmp_path / "single", *one_pair), "--sd15", diffusers_files / "sd15.safetensors")
    run_sd15(set_flag(single, "--controlnet", diffusers_files / "control.pth"))
    run_sd15(folder_argv(files, diffusers_files, tmp_path / "skip", *one_pair, "--clip-skip", "1"))
    folders, single, skip = (np.load(tmp_path / name / "samples.npz")["arr_0"].astype(int)
                             for name in ("folders", "single", "skip"))
    assert np.abs(folders - single).max() <= 1 and (folders == single).mean() > 0.99  # CPU rounding: the same images
    assert np.abs(skip - folders).mean() > 1  # the penultimate layer's context draws other images
    assert json.loads((tmp_path / "skip" / "settings.json").read_text())["clip_skip"] == 1


@pytest.mark.parametrize("flag, value, message", [
    ("--sd15", "sd2", "config.json describes a network outside the SD1.x family built here: use_linear_projection "
                      "true (SD2's linear proj_in / proj_out; SD1.x: false)"),
    ("--clip-skip", "2", "clip skip must be from 0 (the last layer) to 1 (the text encoder has 2 layers), got 2"),
    ("--variant", "fp16", "sd15.safetensors is a single file; a variant (fp16) chooses among the files of a "
                          "diffusers pipeline folder"),
    ("--variant", "bf16", "unet is a folder holding the bf16 variant of none of"),
], ids=["sd2-folder", "clip-skip", "variant-of-a-file", "absent-variant"])
def test_bad_folders_and_flags_exit_2_with_one_error_line(files, diffusers_files, tmp_path, capsys, flag, value,
                                                          message):
    argv = folder_argv(files, diffusers_files, tmp_path / "out") if value in ("sd2", "bf16") else \
        sd15_argv(files, tmp_path / "out")
    if value == "sd2":
        configs = CONFIGS_BY_FOLDER | {"sd/unet": CONFIGS_BY_FOLDER["sd/unet"] | {"use_linear_projection": True}}
        value = write_diffusers_folders(tmp_path, tiny_sd_networks(), "fp16 variant", configs)[0]
    with pytest.raises(SystemExit) as exit_info:
        run_sd15(set_flag(argv, flag, value))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
