"""SD1.5 and ControlNet checkpoint layouts: the LDM <-> diffusers key map on the full SD1.5 key sets (on the meta
device), SD1.5 single files (EMA and training weights, .ckpt with Lightning extras, .safetensors), ControlNet 1.0 /
1.1 / diffusers files, refusal of SD2 / SDXL / other-width checkpoints, a ControlNet initialised from SD1.5, and
diffusers folders: networks built from hand-written config.json files, weights as one file, an fp16 variant or shards,
SD2 / SDXL configs refused by name."""
import json
import re

import pytest
import torch

from ref import clip, text_to_image, vae
from ref.checkpoints import read_checkpoint
from ref.controlnet import CONFIGS, ControlNet
from ref.controlnet import MODELS as CONTROLNETS
from ref.safetensors import save_file
from ref.sd_checkpoints import (clip_arguments, controlnet_from_sd15, diffusers_config, diffusers_key, ema_key,
                                folder_builds, from_diffusers, load, load_sd15, save_diffusers, split_sd15,
                                to_diffusers, unet_arguments, vae_arguments)
from ref.unet import MODELS, UNet
from tests.helpers import (CONFIGS_BY_FOLDER, LAYOUTS, UNET_CONFIG, tiny_sd_networks, write_diffusers_folders,
                           write_weights)

torch.set_num_threads(1)

TINY_SD = CONFIGS["tiny"] | dict(in_channels=4)  # the tiny UNet on 4-channel latents: levels 32 and 64 wide


def on_meta(build, **overrides):
    with torch.device("meta"):
        return build(**overrides)


def randomise(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def assert_same_state(model, expected):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], value) for key, value in expected.items())


# ---------------------------------------------------------------------------------------------------------------------
# The diffusers key map on the full SD1.5 UNet and ControlNet
# ---------------------------------------------------------------------------------------------------------------------
# Sizes: 859,520,964 = diffusers' ModelMixin.num_parameters docstring on stable-diffusion-v1-5's unet ("DiffusionWrapper
# has 859.52 M params" in the LDM load log); 361,279,120 = the parameter audit of a public ControlNet training run on
# lllyasviel/control_v11p_sd15_lineart (diffusers ControlNetModel, same shapes as here: tests/parity/test_sd_parity.py).

LDM_NAMES = r"input_blocks|output_blocks|middle_block\.|in_layers|out_layers|emb_layers|skip_connection|time_embed\.|" \
            r"zero_convs|input_hint_block|\.op\.|^out\."


@pytest.mark.parametrize("models, count, size", [(MODELS, 686, 859_520_964), (CONTROLNETS, 340, 361_279_120)],
                         ids=["unet", "controlnet"])
def test_sd15_key_map_is_a_bijection_keeping_shapes(models, count, size):
    model = on_meta(models["sd15"])
    state = model.state_dict()
    published = to_diffusers(state, num_res_blocks=2)
    assert len(state) == len(published) == count  # every key mapped, no two onto one name
    assert sum(value.numel() for value in published.values()) == size
    assert not [key for key in published if re.search(LDM_NAMES, key)]
    native, original = from_diffusers(published, model)
    assert original == {key: diffusers_key(key, 2) for key in state}
    assert all(native[key] is value for key, value in state.items())  # the same tensors: shapes kept


# LDM key -> diffusers key, written out by hand from the LDM layout (ref/unet.py's docstring) and the conversion tables
# of diffusers' convert_from_ckpt (2 ResBlocks + a Downsample a level; output blocks 3 a level, deepest first).
HAND_MAPPED = {
    "time_embed.2.weight": "time_embedding.linear_2.weight",
    "input_blocks.0.0.bias": "conv_in.bias",
    "input_blocks.2.1.transformer_blocks.0.attn1.to_out.0.weight":
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight",
    "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
    "input_blocks.6.0.op.weight": "down_blocks.1.downsamplers.0.conv.weight",
    "input_blocks.11.0.emb_layers.1.bias": "down_blocks.3.resnets.1.time_emb_proj.bias",
    "middle_block.1.proj_in.weight": "mid_block.attentions.0.proj_in.weight",
    "middle_block.2.out_layers.3.weight": "mid_block.resnets.1.conv2.weight",
    "output_blocks.2.1.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
    "output_blocks.5.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
    "output_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight":
        "up_blocks.2.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
    "output_blocks.9.0.in_layers.0.weight": "up_blocks.3.resnets.0.norm1.weight",
    "out.0.bias": "conv_norm_out.bias",
    "input_hint_block.0.weight": "controlnet_cond_embedding.conv_in.weight",
    "input_hint_block.8.weight": "controlnet_cond_embedding.blocks.3.weight",
    "input_hint_block.14.bias": "controlnet_cond_embedding.conv_out.bias",
    "zero_convs.11.0.weight": "controlnet_down_blocks.11.weight",
    "middle_block_out.0.bias": "controlnet_mid_block.bias",
}


def test_hand_mapped_sd15_keys():
    keys = set(on_meta(MODELS["sd15"]).state_dict()) | set(on_meta(CONTROLNETS["sd15"]).state_dict())
    assert set(HAND_MAPPED) <= keys
    assert {key: diffusers_key(key, 2) for key in HAND_MAPPED} == HAND_MAPPED


def test_sd15_diffusers_blocks_are_those_of_the_config():
    """Down block l: 2 resnets, 2 attentions at levels 0-2, a downsampler but at the last; up block l (deepest first):
    3 resnets, 3 attentions but at the deepest, an upsampler but at level 0."""
    expected = set()
    for level in range(4):
        expected |= {f"down_blocks.{level}.resnets.{i}" for i in range(2)}
        expected |= {f"down_blocks.{level}.attentions.{i}" for i in range(2) if level < 3}
        expected |= {f"down_blocks.{level}.downsamplers.0"} if level < 3 else set()
        expected |= {f"up_blocks.{level}.resnets.{i}" for i in range(3)}
        expected |= {f"up_blocks.{level}.attentions.{i}" for i in range(3) if level > 0}
        expected |= {f"up_blocks.{level}.upsamplers.0"} if level < 3 else set()
    published = to_diffusers(on_meta(MODELS["sd15"]).state_dict(), num_res_blocks=2)
    assert {".".join(key.split(".")[:4]) for key in published if key.startswith(("down_", "up_"))} == expected


@pytest.mark.parametrize("build", [lambda: UNet(**TINY_SD), lambda: ControlNet(**TINY_SD, hint_downsampling=8)],
                         ids=["unet", "controlnet"])
def test_ldm_to_diffusers_folder_and_back_is_the_identity(tmp_path, build):
    ours = randomise(build(), seed=1)
    assert_same_state(load(build(), to_diffusers(ours.state_dict(), num_res_blocks=1)), ours.state_dict())
    folder = save_diffusers(ours, tmp_path / "model")
    assert_same_state(load(on_meta(build), folder), ours.state_dict())
    config = json.loads((folder / "config.json").read_text())
    assert config["block_out_channels"] == [32, 64] and config["layers_per_block"] == 1
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D"]


def test_a_controlnet_with_no_diffusers_counterpart_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hint_downsampling 1 has no diffusers layout"):
        save_diffusers(CONTROLNETS["tiny"](), tmp_path / "model")
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------------------------------------------------
# SD1.5 single files
# ---------------------------------------------------------------------------------------------------------------------

def tiny_parts(seed):
    """A tiny UNet, VAE and text encoder with random weights."""
    unet = randomise(UNet(**TINY_SD), seed)
    return unet, randomise(vae.MODELS["tiny"](), seed + 1), randomise(clip.MODELS["clip-tiny"](), seed + 2)


def sd15_state(unet, autoencoder, text_encoder, ema_unet=None):
    """An SD1.5 single file's state dict at tiny size: the three networks under their prefixes, LDM's schedule
    buffers and, for a full file, the UNet's LitEma copies."""
    state = {f"model.diffusion_model.{key}": value for key, value in unet.state_dict().items()}
    state |= {f"first_stage_model.{key}": value for key, value in autoencoder.state_dict().items()}
    state |= {f"cond_stage_model.transformer.{key}": value for key, value in text_encoder.state_dict().items()}
    state |= {"betas": torch.linspace(1e-4, 2e-2, 1000), "alphas_cumprod": torch.linspace(1.0, 0.0, 1000)}
    if ema_unet is not None:
        state |= {ema_key(key): value for key, value in ema_unet.state_dict().items()}
        state |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7, dtype=torch.int)}
    return state


def empty_models():
    return on_meta(UNet, **TINY_SD), vae.MODELS["tiny"](), on_meta(clip.MODELS["clip-tiny"])


def lightning_file(state, callbacks):
    """A PyTorch Lightning checkpoint around `state`, with the extras LDM training files carry."""
    return {"state_dict": state, "epoch": 3, "global_step": 840000, "pytorch-lightning_version": "1.4.2",
            "callbacks": callbacks, "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}],
            "lr_schedulers": [{"base_lrs": [1e-4], "lr_lambdas": [{"warm_up_steps": [10000]}]}]}


@pytest.mark.parametrize("prefer", ["ema", "model"])
def test_full_ckpt_gives_the_ema_or_the_training_unet_as_asked(tmp_path, prefer):
    unet, autoencoder, text_encoder = tiny_parts(seed=1)
    ema_unet = randomise(UNet(**TINY_SD), seed=9)
    path = tmp_path / "v1-5-pruned.ckpt"
    torch.save(lightning_file(sd15_state(unet, autoencoder, text_encoder, ema_unet),
                              {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}}), path)
    loaded = load_sd15(path, *empty_models(), prefer=prefer)
    for model, expected in zip(loaded, ({"ema": ema_unet, "model": unet}[prefer], autoencoder, text_encoder)):
        assert_same_state(model, expected.state_dict())


def test_emaonly_safetensors_gives_its_unet_and_split_names_the_file_keys(tmp_path):
    unet, autoencoder, text_encoder = tiny_parts(seed=3)
    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    save_file(sd15_state(unet, autoencoder, text_encoder), path)
    loaded = load_sd15(path, *empty_models(), prefer="ema")  # no model_ema.*: model.diffusion_model.* are the EMA
    assert_same_state(loaded[0], unet.state_dict())
    parts = split_sd15(sd15_state(unet, autoencoder, text_encoder, ema_unet=unet))
    assert parts["vae"][1]["decoder.conv_out.bias"] == "first_stage_model.decoder.conv_out.bias"
    assert parts["unet"][1]["out.2.bias"] == "model_ema.diffusion_modelout2bias"
    assert parts["text_encoder"][1]["transformer.text_model.final_layer_norm.weight"] == \
        "cond_stage_model.transformer.text_model.final_layer_norm.weight"


def test_prefer_is_ema_or_model():
    with pytest.raises(ValueError, match="prefer must be 'ema' or 'model', got 'EMA'"):
        split_sd15(sd15_state(*tiny_parts(seed=1)), prefer="EMA")


class ModelCheckpoint:
    """Stands for pytorch_lightning's callback class, which Lightning 1.4 (SD v1's training) pickled as a dict key."""


def test_lightning_1_4_callback_classes_are_refused_by_the_safe_reader(tmp_path):
    path = tmp_path / "sd-v1-full.ckpt"
    torch.save(lightning_file(sd15_state(*tiny_parts(seed=1)), {ModelCheckpoint: {"best_model_score": None}}), path)
    with pytest.raises(ValueError) as error:
        load_sd15(path, *empty_models())
    assert "Unsupported global" in str(error.value) and "ModelCheckpoint" in str(error.value)
    assert "weights_only=False" not in str(error.value)


def test_a_file_without_the_vae_or_text_encoder_is_not_an_sd15_file():
    unet, _, _ = tiny_parts(seed=1)
    with pytest.raises(ValueError, match=r"no first_stage_model\.\* \(vae\), no cond_stage_model\.\* \(text_encoder\)"):
        load_sd15({f"model.diffusion_model.{key}": value for key, value in unet.state_dict().items()},
                  *empty_models())


# ---------------------------------------------------------------------------------------------------------------------
# Other bases refused by name (SD1.5 sizes, on the meta device: only shapes are read)
# ---------------------------------------------------------------------------------------------------------------------

def prefixed(model, prefix):
    return {prefix + key: value for key, value in model.state_dict().items()}


def sd2_state():
    with torch.device("meta"):
        return prefixed(UNet(**CONFIGS["sd15"] | dict(context_dim=1024)), "model.diffusion_model.") | {
            "cond_stage_model.model.token_embedding.weight": torch.empty(49408, 1024)}


def sdxl_state():
    with torch.device("meta"):
        return prefixed(UNet(**CONFIGS["sd15"] | dict(context_dim=2048)), "model.diffusion_model.") | {
            "model.diffusion_model.label_emb.0.0.weight": torch.empty(1280, 2816),
            "conditioner.embedders.1.model.positional_embedding": torch.empty(77, 1280)}


@pytest.mark.parametrize("state, found", [
    (sd2_state, ["an OpenCLIP text encoder, SD2's (cond_stage_model.model.*)",
                 "cross-attention context width 1024 (model.diffusion_model.input_blocks.1.1.transformer_blocks.0."
                 "attn2.to_k.weight (320, 1024)), not 768"]),
    (sdxl_state, ["SDXL's text encoders (conditioner.embedders.*)", "a class / size embedding, SDXL's (label_emb.*)",
                  "cross-attention context width 2048"]),
], ids=["sd2", "sdxl"])
def test_sd2_and_sdxl_checkpoints_are_refused_naming_what_was_found(state, found):
    with pytest.raises(ValueError) as error:
        load(on_meta(MODELS["sd15"]), state())
    message = str(error.value)
    assert message.startswith("checkpoint is not for this UNet (model_channels 320, context width 768")
    assert all(description in message for description in found)


def test_a_controlnet_for_another_base_width_is_refused_by_name():
    other = prefixed(on_meta(ControlNet, **CONFIGS["sd15"] | dict(model_channels=640)), "control_model.")
    with pytest.raises(ValueError, match=re.escape("model_channels 640 (control_model.time_embed.0.weight (2560, "
                                                   "640)), not 320")):
        load(on_meta(CONTROLNETS["sd15"]), other)


# ---------------------------------------------------------------------------------------------------------------------
# ControlNet files and the ControlNet initialised from SD1.5
# ---------------------------------------------------------------------------------------------------------------------

def tiny_controlnet(seed=4):
    return randomise(ControlNet(**TINY_SD, hint_downsampling=8), seed)


@pytest.mark.parametrize("layout", ["1.0 whole model", "1.1 control_model", "bare", "diffusers"])
def test_controlnet_files_of_every_layout_load(tmp_path, layout):
    controlnet, (unet, autoencoder, text_encoder) = tiny_controlnet(), tiny_parts(seed=1)
    state = {"1.0 whole model": prefixed(controlnet, "control_model.") | sd15_state(unet, autoencoder, text_encoder),
             "1.1 control_model": prefixed(controlnet, "control_model."),
             "bare": controlnet.state_dict(),
             "diffusers": to_diffusers(controlnet.state_dict(), num_res_blocks=1)}[layout]
    path = tmp_path / "control.pth"
    torch.save(state, path)
    assert_same_state(load(on_meta(ControlNet, **TINY_SD), path), controlnet.state_dict())


def test_a_controlnet_1_0_file_also_gives_its_unet():
    controlnet, (unet, autoencoder, text_encoder) = tiny_controlnet(), tiny_parts(seed=1)
    state = prefixed(controlnet, "control_model.") | sd15_state(unet, autoencoder, text_encoder)
    assert_same_state(load(UNet(**TINY_SD), state), unet.state_dict())


def test_sd15_controlnet_keys_are_the_unet_encoder_copy_and_its_own_layers():
    unet = on_meta(MODELS["sd15"])
    controlnet = ControlNet.from_unet(unet)
    unet_shapes = {key: value.shape for key, value in unet.state_dict().items()}
    own = ("input_hint_block.", "zero_convs.", "middle_block_out.")
    copied = {key: value.shape for key, value in controlnet.state_dict().items() if not key.startswith(own)}
    assert copied == {key: shape for key, shape in unet_shapes.items()
                      if key.startswith(("time_embed.", "input_blocks.", "middle_block."))}
    assert len(copied) == 340 - 8 * 2 - 13 * 2  # 8 hint convs, 12 zero convs + the middle one


def test_controlnet_from_sd15_starts_as_the_files_encoder_with_zero_residuals():
    unet, autoencoder, text_encoder = tiny_parts(seed=1)
    ema_unet = randomise(UNet(**TINY_SD), seed=9)
    _, controlnet = controlnet_from_sd15(on_meta(UNet, **TINY_SD),
                                         sd15_state(unet, autoencoder, text_encoder, ema_unet))
    state = controlnet.state_dict()
    for key, value in ema_unet.state_dict().items():
        if key.startswith(("time_embed.", "input_blocks.", "middle_block.")):
            assert torch.equal(state[key], value)
    x, hint = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64)
    residuals = controlnet(x, hint, torch.tensor([500]), torch.randn(1, 5, 32))
    assert all(not residual.is_meta and not residual.any() for residual in residuals)


# ---------------------------------------------------------------------------------------------------------------------
# Diffusers folders: the networks built from config.json, the weights in every layout save_pretrained writes
# ---------------------------------------------------------------------------------------------------------------------
def network_outputs(networks):
    """What each network gives for fixed inputs: text context, ControlNet residuals, UNet output, decoded image. The
    weights are copied out of the files' memory maps first: CPU kernels round differently for weights at other memory
    alignments (~1e-5 on these outputs), and the files place them at other offsets."""
    for parameter in (parameter for network in networks for parameter in network.parameters()):
        parameter.data = parameter.data.clone()
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500])
    hint = torch.rand(1, 3, 64, 64, generator=generator)
    with torch.no_grad():
        context = networks.text_encoder(torch.tensor([[49406, 320, 2368, 49407, 49407]]))  # (1, 5, 32)
        residuals = networks.controlnet(x, hint, t, context)
        return [context, *residuals, networks.unet(x, t, context, control=residuals), networks.autoencoder.decode(x)]


# The values of stable-diffusion-v1-5's published unet/, vae/ and text_encoder/ config.json (the fields read here).
SD15_UNET_CONFIG = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4,
                    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
                    "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "flip_sin_to_cos": True,
                    "freq_shift": 0, "norm_eps": 1e-05, "norm_num_groups": 32, "act_fn": "silu",
                    "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False}
SD15_VAE_CONFIG = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                   "latent_channels": 4, "in_channels": 3, "out_channels": 3, "act_fn": "silu", "norm_num_groups": 32,
                   "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
SD15_TEXT_CONFIG = {"architectures": ["CLIPTextModel"], "hidden_size": 768, "intermediate_size": 3072,
                    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
                    "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}


def test_the_published_sd15_configs_build_the_sd15_presets():
    assert unet_arguments(SD15_UNET_CONFIG, "unet") == CONFIGS["sd15"] | {"out_channels": 4}
    assert vae_arguments(SD15_VAE_CONFIG, "vae") == dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4,
                                                         scaling_factor=0.18215)  # vae.MODELS["sd"]
    assert clip_arguments(SD15_TEXT_CONFIG, "text_encoder") == clip.CONFIGS["clip-vit-l14"] | dict(mlp_ratio=4,
                                                                                                    eps=1e-5)
    controlnet = on_meta(CONTROLNETS["sd15"])  # diffusers_config's ControlNetModel config read back
    assert unet_arguments(json.loads(json.dumps(diffusers_config(controlnet))), "controlnet") == CONFIGS["sd15"] | dict(
        hint_channels=3, hint_downsampling=8)


@pytest.fixture(scope="module")
def sd_networks():
    return tiny_sd_networks()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_diffusers_folders_in_every_layout_give_the_preset_paths_outputs(tmp_path, sd_networks, layout):
    """Built from the configs (the "sd15" presets would be SD1.5-sized) and read as one file, the fp16 variant or
    shards, the four networks give what the tiny presets loaded from an SD1.5 single file and a ControlNet 1.1 file
    give."""
    sd_folder, controlnet_folder = write_diffusers_folders(tmp_path, sd_networks, layout)
    save_file(sd15_state(sd_networks.unet, sd_networks.autoencoder, sd_networks.text_encoder),
              tmp_path / "sd15.safetensors")
    torch.save(prefixed(sd_networks.controlnet, "control_model."), tmp_path / "control.pth")
    variant = "fp16" if layout == "fp16 variant" else None
    from_folders = text_to_image.load_networks("sd15", sd_folder, controlnet_folder, variant=variant)
    from_files = text_to_image.load_networks("tiny", tmp_path / "sd15.safetensors", tmp_path / "control.pth")
    for ours, preset in zip(network_outputs(from_folders), network_outputs(from_files)):
        assert torch.equal(ours, preset)


def test_a_config_with_other_heads_builds_them(tmp_path, sd_networks):
    """attention_head_dim 4 (as a per-level list): 4 heads, where the weights alone (the same shapes) cannot say."""
    configs = CONFIGS_BY_FOLDER | {"sd/unet": UNET_CONFIG | {"attention_head_dim": [4, 4]}}
    sd_folder, controlnet_folder = write_diffusers_folders(tmp_path, sd_networks, "one file", configs)
    built = folder_builds(sd_folder, controlnet_folder)["unet"]()
    assert built.encoder_config["num_heads"] == 4
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 32)
    four, two = (load(UNet(**text_to_image.TINY_UNET | {"num_heads": heads}), sd_folder / "unet") for heads in (4, 2))
    with torch.no_grad():
        output = load(built, sd_folder / "unet")(x, t, context)
        assert torch.equal(output, four(x, t, context)) and not torch.allclose(output, two(x, t, context))


SD2_UNET = {"use_linear_projection": True, "upcast_attention": True, "cross_attention_dim": 1024}
SDXL_UNET = {"addition_embed_type": "text_time", "transformer_layers_per_block": [1, 2], "cross_attention_dim": 2048}


@pytest.mark.parametrize("folder, changes, named", [
    ("sd/unet", SD2_UNET, ["use_linear_projection true (SD2's linear proj_in / proj_out",
                           "upcast_attention true (SD2.1's attention upcast to float32"]),
    ("sd/unet", {"cross_attention_dim": 1024}, ["cross_attention_dim 1024 is SD2's OpenCLIP ViT-H context"]),
    ("sd/unet", {"attention_head_dim": [5, 10]}, ["attention_head_dim [5, 10] differs between levels"]),
    ("sd/unet", SDXL_UNET, ["addition_embed_type \"text_time\" (SDXL's added text / time embedding",
                            "transformer_layers_per_block [1, 2] (SDXL's stacked transformer blocks"]),
    ("sd/text_encoder", {"hidden_act": "gelu"}, ["hidden_act \"gelu\" (GELU, SD2's OpenCLIP text encoder"]),
    ("sd/text_encoder", {"architectures": ["CLIPTextModelWithProjection"]},
     ["config.json is for a CLIPTextModelWithProjection; a CLIPTextModel was expected"]),
    ("controlnet", {"global_pool_conditions": True}, ["global_pool_conditions true (pooled"]),
    ("sd/vae", {"shift_factor": 0.1159}, ["shift_factor 0.1159 (a latent shift"]),
], ids=["sd2 unet", "sd2 context", "sd2 heads", "sdxl unet", "sd2 text encoder", "sdxl text encoder 2",
        "pooled controlnet", "sd3 vae"])
def test_configs_outside_sd1x_are_refused_by_name(tmp_path, sd_networks, folder, changes, named):
    configs = CONFIGS_BY_FOLDER | {folder: CONFIGS_BY_FOLDER[folder] | changes}
    sd_folder, controlnet_folder = write_diffusers_folders(tmp_path, sd_networks, "one file", configs)
    with pytest.raises(ValueError) as error:
        text_to_image.load_networks("tiny", sd_folder, controlnet_folder)
    assert all(name in str(error.value) for name in named), str(error.value)


def test_variants_and_shards_are_refused_naming_what_the_folder_holds(tmp_path, sd_networks):
    sd_folder, controlnet_folder = write_diffusers_folders(tmp_path, sd_networks, "fp16 variant")
    with pytest.raises(ValueError, match=r"^SD1\.5 file: .*unet is a folder holding none of .* it holds the "
                                         r"variant\(s\) fp16: choose one \(--variant\)"):
        text_to_image.load_networks("tiny", sd_folder, controlnet_folder)
    with pytest.raises(ValueError, match=r"holding the bf16 variant of none of"):
        text_to_image.load_networks("tiny", sd_folder, controlnet_folder, variant="bf16")
    with pytest.raises(ValueError, match=r"sd15\.safetensors is a single file; a variant \(fp16\) chooses among"):
        load_sd15(tmp_path / "sd15.safetensors", *empty_models(), variant="fp16")
    write_weights(tmp_path / "shards", "model", {"a": torch.ones(2), "b": torch.zeros(3)}, "safetensors shards")
    assert read_checkpoint(tmp_path / "shards").keys() == {"a", "b"}
    index = tmp_path / "shards" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match=r"shard model-00001-of-00002\.safetensors does not hold what the index lists: "
                                         r"1 missing \(b\)"):
        read_checkpoint(index)
