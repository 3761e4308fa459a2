"""`sample.py sd15` against diffusers' StableDiffusionControlNetPipeline on a tiny pipeline with non-default heads (4
in the UNet and ControlNet, where ref.text_to_image's tiny preset has 2), saved with save_pretrained as a user saves
one: the fp16 variant, weights in shards (max_shard_size), transformers' tokenizer.json. The folders go to sample.py as
they are; the same prompt, control, seeds and clip skip give the same images. Skipped without diffusers and
transformers (requirements-parity.txt installs them)."""
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from ref.runtime import SampleDraws
from ref.text_to_image import generate
from ref.tokenizer import clip_vocabulary
from tests.helpers import randomise

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)

MERGES = ["c a", "ca t</w>", "d o", "do g</w>"]
PROMPT, SIZE, STEPS, CFG, SEEDS = "a cat and a dog", 64, 3, 7.5, 2


def sd15_scheduler():  # SD1.5's scheduler_config (as tests/parity/test_ddim_parity.py)
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                   steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")


def tiny_pipeline(folder):
    """A StableDiffusionControlNetPipeline of tiny random networks; its tokenizer reads hand-made merges."""
    vocabulary = clip_vocabulary([tuple(merge.split()) for merge in MERGES])
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocabulary))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *MERGES]) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                           model_max_length=77)
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(vocabulary), hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=vocabulary["<|startoftext|>"],
        eos_token_id=vocabulary["<|endoftext|>"], pad_token_id=vocabulary["<|endoftext|>"])
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4)
    controlnet = randomise(diffusers.ControlNetModel.from_unet(unet), seed=2)
    autoencoder = diffusers.AutoencoderKL(block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4,
                                          down_block_types=("DownEncoderBlock2D",) * 4,
                                          up_block_types=("UpDecoderBlock2D",) * 4)
    return diffusers.StableDiffusionControlNetPipeline(
        vae=randomise(autoencoder, seed=3), text_encoder=randomise(transformers.CLIPTextModel(text_config), seed=4),
        tokenizer=tokenizer, unet=randomise(unet, seed=1), controlnet=controlnet, scheduler=sd15_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def diffusers_images(pipeline, control, clip_skip):
    """(SEEDS, 3, S, S) in [0, 1]: sample i from sample.py's latent noise for seed i (its SampleDraws)."""
    noise = SampleDraws(range(SEEDS)).randn(4, SIZE // 8, SIZE // 8)  # (SEEDS, 4, S/8, S/8)
    with torch.no_grad():
        return torch.cat([pipeline(PROMPT, image=control, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                                   guidance_scale=CFG, latents=latents[None], output_type="pt",
                                   clip_skip=clip_skip or None).images for latents in noise])


def sample_py_images(argv, clip_skip):
    """(SEEDS, 3, S, S) in [0, 1]: the networks, tokenizer and control sample.py sd15 reads for argv, through
    ref.text_to_image.generate as sd15_share calls it (the prompt's context with clip skip, the empty prompt's
    without), before the cast to 8 bits."""
    pairs, hints, tokenizer, networks = sample.load_sd15_inputs(sample.parse_sd15_args(argv))
    with torch.no_grad():
        context = networks.text_encoder(tokenizer([PROMPT] * SEEDS), clip_skip)
        images = generate(networks, context, networks.text_encoder(tokenizer([""])), hints(0)[None].repeat(SEEDS, 1,
                          1, 1), SampleDraws(range(SEEDS)).randn(4, SIZE // 8, SIZE // 8), STEPS, CFG)
    return (images / 2 + 0.5).clamp(0, 1)


def test_sample_py_draws_diffusers_images_from_its_saved_pipeline(tmp_path):
    pipeline = tiny_pipeline(tmp_path / "vocabulary")
    pipeline.save_pretrained(tmp_path / "pipeline", variant="fp16", max_shard_size="100KB")
    saved = sorted(path.name for path in (tmp_path / "pipeline" / "unet").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in saved and len(saved) > 3  # shards
    assert sorted(path.name for path in (tmp_path / "pipeline" / "tokenizer").iterdir()) == [
        "tokenizer.json", "tokenizer_config.json"]
    control = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    control.save(tmp_path / "control.png")
    (tmp_path / "pair.jsonl").write_text(json.dumps(dict(prompt=PROMPT, control="control.png")) + "\n")
    # diffusers 0.42's encode_prompt reads text_encoder.text_model.final_layer_norm for clip_skip; transformers 5's
    # CLIPTextModel holds final_layer_norm itself: the same LayerNorm offered under the old path, so that diffusers'
    # own clip-skip code runs.
    text_encoder = pipeline.text_encoder
    old_path = types.SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm)
    object.__setattr__(text_encoder, "text_model", old_path)
    for clip_skip in (0, 1):
        out = tmp_path / f"skip{clip_skip}"
        argv = list(map(str, [
            "--sd15", tmp_path / "pipeline", "--controlnet", tmp_path / "pipeline" / "controlnet",
            "--tokenizer", tmp_path / "pipeline" / "tokenizer", "--variant", "fp16", "--prompts",
            tmp_path / "pair.jsonl", "--size", SIZE, "--steps", STEPS, "--cfg", CFG, "--seeds-per-prompt", SEEDS,
            "--clip-skip", clip_skip, "--out", out]))
        sample.main(["sd15", *argv])
        theirs = diffusers_images(pipeline, control, clip_skip)  # (SEEDS, 3, S, S) in [0, 1]
        # measured: 2.8e-5 at most, 1.4e-6 on average (float32 rounding through CFG 7.5); with the tiny preset's 2
        # heads in place of the config's 4: 6.5e-3 at most, 3.8e-4 on average
        torch.testing.assert_close(sample_py_images(argv, clip_skip), theirs, rtol=0, atol=1e-4)
        ours = np.load(out / "samples.npz")["arr_0"].astype(int)  # sample.py's pixels: to_uint8(2 y - 1)
        pixels = (255 * theirs + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)
        assert np.abs(ours - pixels).max() <= 1 and (ours == pixels).mean() > 0.99, clip_skip
