"""Helpers shared by the test modules (no test module imports another)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import train
from ref import text_to_image, vae
from ref.safetensors import save_file
from ref.sd_checkpoints import to_diffusers


def train_error(argv, capsys):
    """train.main(argv) must stop with exit status 2; -> what it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(list(map(str, argv)))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def assert_same_state(a, b):
    """Nested dicts / lists of tensors and numbers, bitwise equal."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


def randomise(model, seed=1, scale=0.1):
    """Random weights everywhere, norm scales near 1 (1-d parameters: 1 + noise): zero inits (LDM's residual branches,
    ControlNet's zero convs) would otherwise hide what a test looks at. -> model"""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator) + (parameter.ndim == 1))
    return model


def write_image(path, pixels, mode=None):
    """pixels (H, W[, 3]) uint8 as the image file `path`. -> its name"""
    Image.fromarray(pixels, mode).save(path) if mode else Image.fromarray(pixels).save(path)
    return path.name


def write_folder(folder, task, samples=4, width=None, height=None, size=16, classes=4, generator=None):
    """A metadata.jsonl folder (ref/control_data.py) of `samples` lines: random images with controls of the task's
    kind (label maps of `classes` classes, row 0 unlabelled, with random hints; or grey maps constant on 4 x 4 blocks,
    what 4 x 4 latents hold), width x height pixels (default (size + 4) x size), drawn from `generator` (default: a
    fresh one seeded 0). -> folder"""
    generator = generator or np.random.default_rng(0)
    width, height = width or size + 4, height or size
    folder.mkdir()
    lines = []
    for index in range(samples):
        line = dict(image=write_image(folder / f"image{index}.png",
                                      generator.integers(0, 256, (height, width, 3), dtype=np.uint8)),
                    caption=["a cat", "the cat", "", "a tat"][index % 4])
        if task == "segmentation":
            labels = generator.integers(0, classes, (height, width), dtype=np.uint8)
            labels[0] = 255
            line["control"] = write_image(folder / f"labels{index}.png", labels)
            line["hint"] = write_image(folder / f"hint{index}.png",
                                       generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
        else:
            blocks = generator.integers(0, 256, (height // 4, width // 4), dtype=np.uint8)
            line["control"] = write_image(folder / f"depth{index}.png", np.kron(blocks, np.ones((4, 4), np.uint8)))
        lines.append(json.dumps(line))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


# Text -> what CLIP's cleaning gives (openai/CLIP simple_tokenizer.py: ftfy.fix_text, html.unescape twice, whitespace
# collapsed, lower()), written out here; ftfy 6.3.1 gave each (tests/parity/test_tokenizer_parity.py checks them).
TEXT_KINDS = {
    "ascii": ("A photo of a cat, 4K!", "a photo of a cat, 4k!"),
    "straight contraction": ("don't stop, it's the dog's", "don't stop, it's the dog's"),
    "curly contraction": ("don\u2019t stop, it\u2019s the dog\u2019s", "don't stop, it's the dog's"),
    "curly quotes": ("a sign saying \u201copen\u201d and \u2018closed\u2019", "a sign saying \"open\" and 'closed'"),
    "precomposed accents": ("Caf\u00e9 cr\u00e8me", "caf\u00e9 cr\u00e8me"),
    "combining accents": ("Cafe\u0301 cre\u0300me", "caf\u00e9 cr\u00e8me"),
    "cjk": ("東京の夜景、寿司と라면", "東京の夜景、寿司と라면"),
    "greek": ("Ελληνικό ΝΗΣΙ", "ελληνικό νησι"),
    "cyrillic": ("Привет, МИР", "привет, мир"),
    "arabic": ("مرحبا بالعالم", "مرحبا بالعالم"),
    "emoji": ("a cat \U0001f431 in a hat \U0001f3a9 \U0001f44d\U0001f3fd",
              "a cat \U0001f431 in a hat \U0001f3a9 \U0001f44d\U0001f3fd"),
    "entities": ("Tom &amp; Jerry &lt;3 &quot;hi&quot;", "tom & jerry <3 \"hi\""),
    "double-escaped entity": ("fish &amp;amp; chips", "fish & chips"),
    "entity of a curly quote": ("it&rsquo;s &ldquo;fine&rdquo;", "it's \"fine\""),
    "entity beside a tag": ("<b>bold</b> it&rsquo;s", "<b>bold</b> it\u2019s"),  # ftfy leaves text with "<" escaped
    "ligatures": ("\ufb01ne \ufb02our, \ufb00 \ufb03 \ufb04 \ufb05 \ufb06 \u0132ssel \u0149",
                  "fine flour, ff ffi ffl \u017ft st ijssel 'n"),
    "full-width": ("１２３ ＡＢＣ！ ｃａｔ", "123 abc! cat"),
    "half-width and ideographic space": ("ﾃｽﾄ\u3000ｶﾞ", "テスト ガ"),
    "control characters": ("\ufeffa\x07 cat\x00 sat\u2060\u206a", "a cat sat\u2060"),
    "whitespace": ("  a\tcat\n\nsat\u2028on  a\xa0mat  ", "a cat sat on a mat"),
    "numbers and punctuation": ("3.5 kg... 42% (x\u00b2) \u00bd \u216b", "3.5 kg... 42% (x\u00b2) \u00bd \u217b"),
}


def write_tokenizer_json(folder, vocabulary, merges, pairs=True, model_type="BPE"):
    """tokenizer.json as transformers 5's CLIPTokenizer.save_pretrained writes it (the tokenizers library's format):
    merges as [a, b] pairs (older files: "a b" strings), the start and end tokens as added tokens."""
    specials = ("<|startoftext|>", "<|endoftext|>")
    added = [{"id": vocabulary[token], "content": token, "special": True} for token in specials]
    model = {"type": model_type, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "",
             "end_of_word_suffix": "</w>", "vocab": {k: v for k, v in vocabulary.items() if k not in specials},
             "merges": [merge.split(" ") if pairs else merge for merge in merges]}
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": added, "model": model}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------------
# Diffusers folders of ref.text_to_image's tiny networks
# ---------------------------------------------------------------------------------------------------------------------
# Configs written by hand with the field names of SD1.5's published unet/, vae/ and text_encoder/ config.json and of
# diffusers' ControlNetModel, at the sizes of ref.text_to_image's "tiny" architecture.
UNET_CONFIG = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4,
               "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 2,
               "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
               "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 32,
               "use_linear_projection": False, "upcast_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
               "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_num_groups": 32, "sample_size": 8}
CONFIGS_BY_FOLDER = {
    "sd/unet": UNET_CONFIG,
    "controlnet": {key: value for key, value in UNET_CONFIG.items() if key not in ("out_channels", "up_block_types")}
    | {"_class_name": "ControlNetModel", "conditioning_channels": 3,
       "conditioning_embedding_out_channels": [16, 32, 96, 256], "controlnet_conditioning_channel_order": "rgb"},
    "sd/vae": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "block_out_channels": [32] * 4,
               "layers_per_block": 1, "latent_channels": 4, "scaling_factor": 0.18215, "force_upcast": True,
               "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4},
    "sd/text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
                        "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                        "layer_norm_eps": 1e-5},
}
LAYOUTS = ["one file", "fp16 variant", "safetensors shards", "bin shards"]


def write_weights(folder, name, state, layout):
    """`state` as a model folder's weights `name` (diffusion_pytorch_model, model) in a save_pretrained layout: one
    .safetensors, its fp16 variant (name.fp16.safetensors), or two shards and their index (name.safetensors.index.json;
    .bin shards: transformers' pytorch_model.bin.index.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "one file":
        return save_file(state, folder / f"{name}.safetensors")
    if layout == "fp16 variant":
        return save_file({key: value.half() for key, value in state.items()}, folder / f"{name}.fp16.safetensors")
    suffix = "safetensors" if layout == "safetensors shards" else "bin"
    name = "pytorch_model" if (name, suffix) == ("model", "bin") else name
    keys, weight_map = list(state), {}
    for number, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:]), start=1):
        shard = f"{name}-{number:05d}-of-00002.{suffix}"
        (save_file if suffix == "safetensors" else torch.save)({key: state[key] for key in part}, folder / shard)
        weight_map |= dict.fromkeys(part, shard)
    (folder / f"{name}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def tiny_sd_networks():
    """text_to_image's tiny networks (unet, controlnet, text_encoder, autoencoder), random weights that float16
    holds exactly (so the fp16 variant loads the same values)."""
    builds = text_to_image.ARCHITECTURES["tiny"].values()
    networks = [randomise(build(), seed) for seed, build in enumerate(builds)]
    with torch.no_grad():
        for parameter in (parameter for network in networks for parameter in network.parameters()):
            parameter.copy_(parameter.half().float())
    return text_to_image.Networks(*networks)


def write_diffusers_folders(root, networks, layout, configs=CONFIGS_BY_FOLDER):
    """root/sd (a pipeline folder: unet/, vae/, text_encoder/) and root/controlnet, each with its config.json."""
    states = {"sd/unet": to_diffusers(networks.unet.state_dict(), num_res_blocks=1),
              "controlnet": to_diffusers(networks.controlnet.state_dict(), num_res_blocks=1),
              "sd/vae": vae.to_diffusers(networks.autoencoder.state_dict(), num_levels=4),
              "sd/text_encoder": networks.text_encoder.state_dict()}
    for folder, state in states.items():
        write_weights(root / folder, "model" if folder == "sd/text_encoder" else "diffusion_pytorch_model", state,
                      layout)
        (root / folder / "config.json").write_text(json.dumps(configs[folder]))
    return root / "sd", root / "controlnet"
