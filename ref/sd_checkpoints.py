"""Stable Diffusion 1.5 and ControlNet checkpoint layouts: single files, ControlNet 1.0 / 1.1 files and diffusers.

SD1.5 single file (v1-5-pruned.ckpt / -emaonly, .ckpt or .safetensors; raw or under "state_dict"):
    model.diffusion_model.*   the UNet (ref.unet, LDM names)
    first_stage_model.*       the VAE (ref.vae)
    cond_stage_model.*        the CLIP text encoder (ref.clip; cond_stage_model.transformer.text_model.*)
    model_ema.*               in "full" files only: the UNet's EMA weights, each named by its UNet key without the
                              dots (LDM's LitEma: model.diffusion_model.out.2.bias ->
                              model_ema.diffusion_modelout2bias); model.diffusion_model.* then holds the non-EMA
                              training weights. An "emaonly" file has no model_ema.*: its model.diffusion_model.* are
                              the EMA weights. `prefer` chooses ("ema", the default, or "model"; see split_sd15).
    betas, alphas_cumprod, .. LDM's noise-schedule buffers: not read (the schedule is ref.schedules')
ControlNet 1.0 files hold control_model.* beside a whole SD1.5 model, ControlNet 1.1 files control_model.* alone or,
once extracted, the same keys bare (ref.controlnet's names).

Diffusers layouts (UNet2DConditionModel, ControlNetModel; diffusers' convert_from_ckpt / single_file_utils tables and
LDM's openaimodel.py for the facts) differ from LDM's in names only: `diffusers_key` maps every LDM key of a UNet or
ControlNet with `num_res_blocks` ResBlocks a level, and its inverse on a model's keys maps back. SD1.5 keeps 1x1-conv
proj_in / proj_out in both (use_linear_projection False) and Linear to_q / to_k / to_v / to_out.0 in both, so no
shape changes.
"""
import json
import re
from pathlib import Path

from ref import clip, vae
from ref.checkpoints import check_state_fits, read_state_dict, unwrap_state
from ref.controlnet import HINT_WIDTHS, ControlNet
from ref.safetensors import save_file
from ref.unet import UNet, select_state

UNET_PREFIX = UNet.checkpoint_prefix  # model.diffusion_model.
EMA_PREFIX = "model_ema."
SD15_PARTS = {"unet": UNET_PREFIX, "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
# Keys of other Stable Diffusion generations, and what they are (anywhere in a key: bare or under a prefix).
FOREIGN_KEYS = {
    "conditioner.embedders.": "SDXL's text encoders (conditioner.embedders.*)",
    "cond_stage_model.model.": "an OpenCLIP text encoder, SD2's (cond_stage_model.model.*)",
    "label_emb.": "a class / size embedding, SDXL's (label_emb.*)",
    "add_embedding.": "a class / size embedding, SDXL's in the diffusers layout (add_embedding.*)",
}
DIFFUSERS_MARKERS = ("conv_in.", "time_embedding.", "down_blocks.", "controlnet_cond_embedding.")


# ---------------------------------------------------------------------------------------------------------------------
# Recognising a checkpoint that is not for this model
# ---------------------------------------------------------------------------------------------------------------------

def first_key(state, pattern):
    return next((key for key in state if re.search(pattern, key)), None)


def foreign_features(state, model):
    """What in `state` (any layout) does not belong to an SD-style model like `model`: other generations' keys, another
    base width (the time embedding's input = model_channels) or another context width (cross-attention to_k input;
    SD2's is 1024). -> a list of descriptions, empty when nothing was found."""
    found = [description for marker, description in FOREIGN_KEYS.items()
             if first_key(state, rf"(^|\.){re.escape(marker)}") is not None]
    config = model.encoder_config
    for pattern, index, what, expected in (
            (r"(time_embed\.0|time_embedding\.linear_1)\.weight$", 1, "model_channels", config["model_channels"]),
            (r"attn2\.to_k\.weight$", 1, "cross-attention context width", config["context_dim"])):
        key = first_key(state, pattern)
        if key is not None and state[key].ndim == 2 and state[key].shape[index] != expected:
            found.append(f"{what} {state[key].shape[index]} ({key} {tuple(state[key].shape)}), not {expected}")
    return found


def check_base(state, model):
    """Refuse, naming what was found, a checkpoint for another base model than `model`'s (SD2, SDXL, a ControlNet
    for another width)."""
    found = foreign_features(state, model)
    if found:
        config = model.encoder_config
        raise ValueError(f"checkpoint is not for this {type(model).__name__} (model_channels "
                         f"{config['model_channels']}, context width {config['context_dim']}: SD1.5's are 320 and "
                         f"768): found " + "; ".join(found))


# ---------------------------------------------------------------------------------------------------------------------
# SD1.5 single files
# ---------------------------------------------------------------------------------------------------------------------

def ema_key(unet_key):
    """The LitEma name of a UNet key in a full SD file: model_ema. + diffusion_model<key without dots>."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def has_ema(state):
    """Whether an SD file holds the UNet's EMA copies (a "full" file)."""
    return any(key.startswith(EMA_PREFIX + "diffusion_model") for key in state)


def split_sd15(state, prefer="ema"):
    """An SD1.5 single file's state dict -> {"unet" | "vae" | "text_encoder": ({key: tensor}, {key: key in file})},
    prefixes stripped. The UNet: its EMA copies when prefer="ema" and the file has them (a full file), otherwise
    model.diffusion_model.* (prefer="model": a full file's non-EMA weights; an emaonly file's EMA weights)."""
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    parts = {}
    for part, prefix in SD15_PARTS.items():
        original = {key[len(prefix):]: key for key in state if key.startswith(prefix)}
        if part == "unet" and prefer == "ema" and has_ema(state):
            original = {key: ema_key(key) for key in original}
            missing = [key for key in original.values() if key not in state]
            if missing:
                raise ValueError(f"the file's EMA weights lack {len(missing)} of the UNet's: {', '.join(missing[:5])}"
                                 f"{' ...' if len(missing) > 5 else ''}")
        parts[part] = {key: state[file_key] for key, file_key in original.items()}, original
    return parts


# ---------------------------------------------------------------------------------------------------------------------
# The diffusers layout of the UNet and ControlNet
# ---------------------------------------------------------------------------------------------------------------------

RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
MIDDLE_LAYERS = ((0, 0), (1, 0), (0, 1))  # middle_block.0/1/2: (kind, place) = ResBlock 0, transformer 0, ResBlock 1
MODULE_NAMES = {
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
    "input_hint_block.0": "controlnet_cond_embedding.conv_in",
    f"input_hint_block.{2 * len(HINT_WIDTHS)}": "controlnet_cond_embedding.conv_out",
    "middle_block_out.0": "controlnet_mid_block",
}


def layer_name(kind, index, rest):
    """A ResBlock's (kind 0) or spatial transformer's (kind 1) sub-module inside a diffusers block; a transformer's
    inside names (norm, proj_in, transformer_blocks.0.attn1.to_q, .., proj_out) are the same in both layouts."""
    return f"resnets.{index}.{RESNET_NAMES.get(rest, rest)}" if kind == 0 else f"attentions.{index}.{rest}"


def diffusers_module(name, num_res_blocks):
    """The diffusers name of an LDM module path (see diffusers_key)."""
    if name in MODULE_NAMES:
        return MODULE_NAMES[name]
    per_level = num_res_blocks + 1  # input blocks a level (ResBlocks, then the Downsample); output blocks a level
    if match := re.fullmatch(r"input_hint_block\.(\d+)", name):  # the convs between the first and the last
        return f"controlnet_cond_embedding.blocks.{int(match[1]) // 2 - 1}"
    if match := re.fullmatch(r"zero_convs\.(\d+)\.0", name):
        return f"controlnet_down_blocks.{match[1]}"
    if match := re.fullmatch(r"middle_block\.(\d)\.(.+)", name):
        return f"mid_block.{layer_name(*MIDDLE_LAYERS[int(match[1])], match[2])}"
    if match := re.fullmatch(r"input_blocks\.(\d+)\.(\d)\.(.+)", name):
        level, index = divmod(int(match[1]) - 1, per_level)
        if index == num_res_blocks:  # the level's Downsample (op)
            return f"down_blocks.{level}.downsamplers.0.conv"
        return f"down_blocks.{level}.{layer_name(int(match[2]), index, match[3])}"
    if match := re.fullmatch(r"output_blocks\.(\d+)\.(\d)\.(.+)", name):
        level, index = divmod(int(match[1]), per_level)  # up_blocks run deepest first, as output_blocks do
        if match[3] == "conv":  # the level's Upsample, after the ResBlock (and transformer)
            return f"up_blocks.{level}.upsamplers.0.conv"
        return f"up_blocks.{level}.{layer_name(int(match[2]), index, match[3])}"
    return name


def diffusers_key(ldm_key, num_res_blocks):
    """The diffusers name of an LDM-layout UNet / ControlNet key (num_res_blocks: ResBlocks a level in the encoder).

    time_embed.0/2 -> time_embedding.linear_1/2; input_blocks.0.0 -> conv_in; input_blocks.n (n >= 1, level l, place
    i) -> down_blocks.l.resnets.i / attentions.i, or downsamplers.0.conv for the Downsample; middle_block.0/1/2 ->
    mid_block.resnets.0 / attentions.0 / resnets.1; output_blocks.n -> up_blocks.l.resnets.i / attentions.i /
    upsamplers.0.conv; out.0/2 -> conv_norm_out / conv_out; ResBlock in_layers.0/2, emb_layers.1, out_layers.0/3,
    skip_connection -> norm1/conv1, time_emb_proj, norm2/conv2, conv_shortcut. ControlNet: input_hint_block.0/2j+2/14
    -> controlnet_cond_embedding.conv_in/blocks.j/conv_out; zero_convs.n.0 -> controlnet_down_blocks.n;
    middle_block_out.0 -> controlnet_mid_block. A key of neither network is returned as it is."""
    module, _, parameter = ldm_key.rpartition(".")
    return f"{diffusers_module(module, num_res_blocks)}.{parameter}"


def to_diffusers(state, num_res_blocks):
    """An LDM-layout UNet / ControlNet state dict in the diffusers layout (the same tensors)."""
    return {diffusers_key(key, num_res_blocks): value for key, value in state.items()}


def from_diffusers(state, model):
    """A diffusers-layout state dict in `model`'s LDM layout; keys with no counterpart in `model` stay as they are.
    -> {LDM key: tensor}, {LDM key: the key in `state`}"""
    ldm_key = {diffusers_key(key, model.encoder_config["num_res_blocks"]): key for key in model.state_dict()}
    original = {ldm_key.get(key, key): key for key in state}
    return {key: state[file_key] for key, file_key in original.items()}, original


def is_diffusers(state):
    return any(key.startswith(DIFFUSERS_MARKERS) for key in state)


# ---------------------------------------------------------------------------------------------------------------------
# Loading and writing
# ---------------------------------------------------------------------------------------------------------------------

def file_state(checkpoint, expected="the weights of a UNet or ControlNet"):
    """A path (file or diffusers folder) or a checkpoint dict -> its state dict (see ref.checkpoints.unwrap_state).
    expected: what the file should be, in words, for its errors."""
    if isinstance(checkpoint, dict):
        return unwrap_state(checkpoint)[0]
    return read_state_dict(checkpoint, expected)[0]


def native_state(model, state, prefer="ema"):
    """`model`'s LDM-layout state dict out of a UNet / ControlNet state dict in any layout: an SD1.5 single file (the
    UNet's EMA or training weights, see split_sd15), a ControlNet 1.0 / 1.1 file (control_model.* or bare), a bare
    LDM state dict or the diffusers layout. -> {key: tensor}, {key: the key in the file}"""
    if is_diffusers(state):
        return from_diffusers(state, model)
    if isinstance(model, UNet) and any(key.startswith(UNET_PREFIX) for key in state):
        return split_sd15(state, prefer)["unet"]
    return select_state(state, model.checkpoint_prefix)


def load(model, checkpoint, prefer="ema"):
    """Load a UNet or ControlNet from a path or checkpoint dict in any layout of native_state, all or nothing: a
    checkpoint for another base (SD2, SDXL, another width) is refused naming what was found, a file without a hint
    encoder given for a ControlNet is refused naming its key prefixes, then missing, unexpected and mismatched keys
    are named before anything is copied. A model on the meta device takes the file's tensors as they are. -> model"""
    state = file_state(checkpoint)
    check_base(state, model)
    native, original = native_state(model, state, prefer)
    if isinstance(model, ControlNet) and not any(key.startswith("input_hint_block.") for key in native):
        found = sorted({key.split(".")[0] for key in state})
        raise ValueError(f"not a ControlNet: no hint encoder (control_model.input_hint_block.* or "
                         f"controlnet_cond_embedding.*); the file's keys start with {', '.join(found[:6])}")
    check_state_fits(model, native, original)
    model.load_state_dict(native, assign=any(parameter.is_meta for parameter in model.parameters()))
    return model


# The model folders of a diffusers pipeline folder (StableDiffusionPipeline.save_pretrained: SD1.5 is also published so)
PIPELINE_FOLDERS = ("unet", "vae", "text_encoder")


def load_sd15(checkpoint, unet, autoencoder, text_encoder, prefer="ema"):
    """Read an SD1.5 single file once, or a diffusers pipeline folder (unet/, vae/, text_encoder/), and load its UNet
    (EMA or training weights, see split_sd15), VAE and text encoder into the given models, each all or nothing; a file
    for another base model or missing one of the three is refused naming what was found or missing.
    -> (unet, autoencoder, text_encoder)"""
    if isinstance(checkpoint, (str, Path)) and Path(checkpoint).is_dir():
        return load_sd15_pipeline(Path(checkpoint), unet, autoencoder, text_encoder)
    state = file_state(checkpoint, "the weights of an SD1.5 single file (UNet, VAE and text encoder)")
    check_base(state, unet)
    absent = [f"{prefix}* ({part})" for part, prefix in SD15_PARTS.items()
              if not any(key.startswith(prefix) for key in state)]
    if absent:
        raise ValueError(f"not an SD1.5 single file: it has no {', no '.join(absent)} keys")
    load(unet, state, prefer)
    vae.load_state(autoencoder, state)
    clip.load_checkpoint(text_encoder, state)
    return unet, autoencoder, text_encoder


def load_sd15_pipeline(folder, unet, autoencoder, text_encoder):
    """load_sd15 for a diffusers pipeline folder: each network from its model folder (ref.checkpoints.read_checkpoint
    finds the weights file inside)."""
    absent = [name for name in PIPELINE_FOLDERS if not (folder / name).is_dir()]
    if absent:
        raise ValueError(f"{folder} is a folder but not a diffusers SD1.5 pipeline: it has no {', no '.join(absent)} "
                         f"model folder (expected unet/, vae/, text_encoder/ as StableDiffusionPipeline saves them)")
    load(unet, folder / "unet")
    vae.load_state(autoencoder, file_state(folder / "vae"))
    clip.load_checkpoint(text_encoder, folder / "text_encoder")
    return unet, autoencoder, text_encoder


def controlnet_from_sd15(unet, checkpoint, prefer="ema", hint_channels=3, hint_downsampling=8):
    """A ControlNet initialised as the ControlNet paper does: its encoder a copy of the UNet's, loaded from an SD1.5
    checkpoint into `unet` (build it on the meta device to skip a random init), its hint encoder's last conv and
    zero convs at zero. -> (unet, controlnet)"""
    load(unet, checkpoint, prefer)
    return unet, ControlNet.from_unet(unet, hint_channels, hint_downsampling)


def diffusers_config(model):
    """The config.json of the diffusers model with `model`'s architecture (UNet2DConditionModel or ControlNetModel).
    Only hint_downsampling 8 has a diffusers counterpart (its conditioning embedding always strides three times)."""
    config = model.encoder_config
    widths = [mult * config["model_channels"] for mult in config["channel_mult"]]
    down = ["CrossAttnDownBlock2D" if level in config["attention_levels"] else "DownBlock2D"
            for level in range(len(widths))]
    common = dict(in_channels=config["in_channels"], block_out_channels=widths,
                  layers_per_block=config["num_res_blocks"], cross_attention_dim=config["context_dim"],
                  attention_head_dim=config["num_heads"], down_block_types=down, flip_sin_to_cos=True, freq_shift=0,
                  norm_num_groups=32, use_linear_projection=False)
    if isinstance(model, UNet):
        up = [block.replace("Down", "Up") for block in reversed(down)]
        return dict(_class_name="UNet2DConditionModel", out_channels=model.out_channels, up_block_types=up,
                    mid_block_type="UNetMidBlock2DCrossAttn", **common)
    if model.hint_downsampling != 8:
        raise ValueError(f"a ControlNet with hint_downsampling {model.hint_downsampling} has no diffusers layout "
                         f"(ControlNetModel's conditioning embedding downsamples by 8)")
    return dict(_class_name="ControlNetModel", conditioning_channels=model.hint_channels,
                conditioning_embedding_out_channels=list(HINT_WIDTHS[::2]), **common)


def save_diffusers(model, folder):
    """Write a UNet or ControlNet as a diffusers model folder: config.json and diffusion_pytorch_model.safetensors
    (diffusers' from_pretrained reads it; so does `load`). -> the folder"""
    config = diffusers_config(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = to_diffusers(model.state_dict(), model.encoder_config["num_res_blocks"])
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
