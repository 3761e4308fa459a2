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

A diffusers model folder's config.json says what network its weights are for; `folder_builds` builds each network of
a pipeline folder (unet/, vae/, text_encoder/) or ControlNet folder from it (unet_arguments, vae_arguments,
clip_arguments), within the SD1.x family these modules implement, and refuses the rest naming the field (SD2's linear
projections and OpenCLIP text encoder, SDXL's added embeddings, upcast_attention, ...). A single file has no config:
it is read with the SD1.5 presets, and check_base refuses it when its shapes say otherwise.
"""
import functools
import json
import re
from pathlib import Path

from ref import clip, vae
from ref.checkpoints import check_state_fits, folder_weights, read_state_dict, unwrap_state
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

# The model folders in a checkpoint-N/ folder of the InnerControl release's training (accelerate's save_state):
# the ControlNet's save_pretrained in controlnet/ (train/reward_control_aligned.py:1394-1402) and its EMA's in
# controlnet_ema/ (:1918-1919). The EMA first: the weights the release evaluates (eval/eval_depth.sh:1, an _ema folder).
TRAINING_CHECKPOINT_FOLDERS = ("controlnet_ema", "controlnet")


def model_folder(path):
    """A release's checkpoint-N/ folder (accelerate's save_state) -> its controlnet_ema/ subfolder, else its
    controlnet/ one (the release evaluates the EMA weights); any other path as it is."""
    inside = [Path(path) / name for name in TRAINING_CHECKPOINT_FOLDERS if (Path(path) / name).is_dir()]
    return inside[0] if inside else path


def file_state(checkpoint, expected="the weights of a UNet or ControlNet"):
    """A path (file, diffusers folder or a release's checkpoint-N/ folder) or a checkpoint dict -> its state dict (see
    ref.checkpoints.unwrap_state). expected: what the file should be, in words, for its errors."""
    if isinstance(checkpoint, dict):
        return unwrap_state(checkpoint)[0]
    return read_state_dict(model_folder(checkpoint), expected)[0]


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


def load_sd15(checkpoint, unet, autoencoder, text_encoder, prefer="ema", variant=None):
    """Read an SD1.5 single file once, or a diffusers pipeline folder (unet/, vae/, text_encoder/; `variant` choosing
    their weights files, see weights_path), and load its UNet (EMA or training weights, see split_sd15), VAE and text
    encoder into the given models, each all or nothing; a file for another base model or missing one of the three is
    refused naming what was found or missing. -> (unet, autoencoder, text_encoder)"""
    if isinstance(checkpoint, (str, Path)) and Path(checkpoint).is_dir():
        return load_sd15_pipeline(Path(checkpoint), unet, autoencoder, text_encoder, variant)
    if variant is not None:
        raise ValueError(f"{checkpoint} is a single file; a variant ({variant}) chooses among the files of a diffusers "
                         f"pipeline folder")
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


def load_sd15_pipeline(folder, unet, autoencoder, text_encoder, variant=None):
    """load_sd15 for a diffusers pipeline folder: each network from its model folder (weights_path finds the weights
    file or shard index inside)."""
    absent = [name for name in PIPELINE_FOLDERS if not (folder / name).is_dir()]
    if absent:
        raise ValueError(f"{folder} is a folder but not a diffusers SD1.5 pipeline: it has no {', no '.join(absent)} "
                         f"model folder (expected unet/, vae/, text_encoder/ as StableDiffusionPipeline saves them)")
    load(unet, weights_path(folder / "unet", variant))
    vae.load_state(autoencoder, file_state(weights_path(folder / "vae", variant)))
    clip.load_checkpoint(text_encoder, weights_path(folder / "text_encoder", variant))
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


# ---------------------------------------------------------------------------------------------------------------------
# Building the networks from a diffusers / transformers folder's config.json
# ---------------------------------------------------------------------------------------------------------------------

# Fields whose value is fixed in the SD1.x family: {field: (SD1.x's value, what another value means)}. A field the
# config leaves out takes diffusers' default, which is SD1.x's for each of these (UNet2DConditionModel.__init__,
# ControlNetModel.__init__, AutoencoderKL.__init__ in diffusers 0.42).
UNET_FIXED = {
    "use_linear_projection": (False, "SD2's linear proj_in / proj_out"),
    "upcast_attention": (False, "SD2.1's attention upcast to float32, which changes the numerics"),
    "addition_embed_type": (None, "SDXL's added text / time embedding"),
    "transformer_layers_per_block": (1, "SDXL's stacked transformer blocks"),
    "reverse_transformer_layers_per_block": (None, "SDXL-style stacked transformer blocks"),
    "class_embed_type": (None, "a class embedding"),
    "num_class_embeds": (None, "a class embedding"),
    "encoder_hid_dim": (None, "a projection of the context (encoder_hid_proj)"),
    "time_cond_proj_dim": (None, "LCM's guidance embedding"),
    "num_attention_heads": (None, "num_attention_heads, which diffusers' SD UNet refuses"),
    "dual_cross_attention": (False, "dual cross-attention"),
    "only_cross_attention": (False, "cross-attention in place of self-attention"),
    "mid_block_only_cross_attention": (None, "cross-attention in place of self-attention"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", "another middle block"),
    "attention_type": ("default", "gated (GLIGEN) attention"),
    "flip_sin_to_cos": (True, "sines before cosines in the timestep embedding"),
    "freq_shift": (0, "a shifted timestep frequency"),
    "time_embedding_type": ("positional", "another timestep embedding"),
    "time_embedding_dim": (None, "another timestep embedding width"),
    "time_embedding_act_fn": (None, "another timestep embedding"),
    "timestep_post_act": (None, "another timestep embedding"),
    "resnet_time_scale_shift": ("default", "scale-shift timestep conditioning"),
    "resnet_skip_time_act": (False, "another ResNet block"),
    "resnet_out_scale_factor": (1.0, "another ResNet block"),
    "act_fn": ("silu", "another activation"),
    "norm_num_groups": (32, "another GroupNorm"),
    "norm_eps": (1e-5, "another GroupNorm"),
    "center_input_sample": (False, "input centring"),
    "downsample_padding": (1, "another downsampling"),
    "mid_block_scale_factor": (1, "a scaled middle block"),
    "conv_in_kernel": (3, "another input conv"),
    "conv_out_kernel": (3, "another output conv"),
    "class_embeddings_concat": (False, "a class embedding"),
    "cross_attention_norm": (None, "a normalised context"),
    # ControlNetModel's own
    "conditioning_embedding_out_channels": ([16, 32, 96, 256], "another hint encoder"),
    "controlnet_conditioning_channel_order": ("rgb", "BGR control images"),
    "global_pool_conditions": (False, "pooled (shuffle-style) residuals"),
}
OTHER_CONTEXTS = {1024: "SD2's OpenCLIP ViT-H context", 2048: "SDXL's two-encoder context"}
VAE_FIXED = {
    "in_channels": (3, "another image channel count"), "out_channels": (3, "another image channel count"),
    "act_fn": ("silu", "another activation"), "norm_num_groups": (32, "another GroupNorm"),
    "shift_factor": (None, "a latent shift (SD3 / Flux's VAE)"),
    "latents_mean": (None, "per-channel latent statistics"), "latents_std": (None, "per-channel latent statistics"),
    "use_quant_conv": (True, "no quant_conv"),
    "use_post_quant_conv": (True, "no post_quant_conv"), "mid_block_add_attention": (True, "no middle attention"),
}
CLIP_FIXED = {"hidden_act": ("quick_gelu", "GELU, SD2's OpenCLIP text encoder")}


def read_config(folder):
    """A model folder's config.json -> dict, None when it has none."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: expected a JSON object, a diffusers / transformers model config ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, a diffusers / transformers model config")
    return config


def refuse_outside_family(config, fixed, path, required=()):
    """Raise naming every field of `config` whose value leaves the SD1.x family (`fixed`) and every missing
    `required` field."""
    found = [f"{field} {json.dumps(config[field])} ({meaning}; SD1.x: {json.dumps(value)})"
             for field, (value, meaning) in fixed.items() if field in config and config[field] != value]
    found += [f"no {field}" for field in required if field not in config]
    if found:
        raise ValueError(f"{path}/config.json describes a network outside the SD1.x family built here: "
                         + "; ".join(found))


def one_value(config, field, path):
    """A per-level field given as one number or as a list of equal ones -> the number."""
    value = config[field]
    values = set(value) if isinstance(value, list) else {value}
    if len(values) != 1 or not isinstance(next(iter(values)), int):
        raise ValueError(f"{path}/config.json: {field} {json.dumps(value)} differs between levels (SD2's per-level "
                         f"heads); these networks take one value for every level")
    return values.pop()


UNET_REQUIRED = ("in_channels", "block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
                 "down_block_types")


def unet_arguments(config, path):
    """A UNet2DConditionModel / ControlNetModel config.json -> the keyword arguments of ref.unet.UNet /
    ref.controlnet.ControlNet (the inverse of diffusers_config): block_out_channels -> model_channels, channel_mult;
    layers_per_block -> num_res_blocks; CrossAttn* blocks -> attention_levels; attention_head_dim -> num_heads (the
    number of heads: diffusers' SD UNets read attention_head_dim as the head count, unet_2d_condition.py
    `num_attention_heads = num_attention_heads or attention_head_dim`); cross_attention_dim -> context_dim."""
    refuse_outside_family(config, UNET_FIXED, path, UNET_REQUIRED)
    context_dim = config["cross_attention_dim"]
    if context_dim in OTHER_CONTEXTS:
        raise ValueError(f"{path}/config.json: cross_attention_dim {context_dim} is {OTHER_CONTEXTS[context_dim]}, "
                         f"not an SD1.x model (768, CLIP ViT-L/14)")
    widths, down = config["block_out_channels"], config["down_block_types"]
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if len(down) != len(widths) or not set(down) <= known or any(width % widths[0] for width in widths):
        raise ValueError(f"{path}/config.json: down_block_types {down} with block_out_channels {widths}: expected one "
                         f"of {sorted(known)} a level, widths multiples of the first")
    expected_up = [block.replace("Down", "Up") for block in reversed(down)]
    if config.get("up_block_types", expected_up) != expected_up:
        raise ValueError(f"{path}/config.json: up_block_types {config['up_block_types']} do not mirror "
                         f"down_block_types (expected {expected_up})")
    arguments = dict(in_channels=config["in_channels"], model_channels=widths[0],
                     channel_mult=tuple(width // widths[0] for width in widths),
                     num_res_blocks=one_value(config, "layers_per_block", path),
                     attention_levels=tuple(level for level, block in enumerate(down) if block.startswith("CrossAttn")),
                     num_heads=one_value(config, "attention_head_dim", path), context_dim=context_dim)
    if config_class(config) == "ControlNetModel":
        return arguments | dict(hint_channels=config.get("conditioning_channels", 3), hint_downsampling=8)
    return arguments | dict(out_channels=config.get("out_channels", config["in_channels"]))


def vae_arguments(config, path):
    """An AutoencoderKL config.json -> ref.vae.AutoencoderKL's keyword arguments: block_out_channels -> ch, ch_mult;
    layers_per_block -> num_res_blocks; latent_channels -> z_channels; scaling_factor (diffusers' default 0.18215,
    SD1.x's). Attention in the middle blocks only, as diffusers' AutoencoderKL."""
    refuse_outside_family(config, VAE_FIXED, path, ("block_out_channels", "layers_per_block", "latent_channels"))
    widths = config["block_out_channels"]
    if any(width % widths[0] for width in widths):
        raise ValueError(f"{path}/config.json: block_out_channels {widths} are not multiples of the first")
    return dict(ch=widths[0], ch_mult=tuple(width // widths[0] for width in widths),
                num_res_blocks=config["layers_per_block"], z_channels=config["latent_channels"],
                scaling_factor=config.get("scaling_factor", 0.18215))


CLIP_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def clip_arguments(config, path):
    """A transformers CLIPTextConfig (text_encoder/config.json; a whole CLIPConfig's text_config) -> ref.clip.
    CLIPTextModel's keyword arguments: hidden_size -> width, num_hidden_layers -> depth, num_attention_heads ->
    num_heads, intermediate_size / hidden_size -> mlp_ratio, max_position_embeddings -> context_length (77),
    layer_norm_eps -> eps (1e-5)."""
    config = config.get("text_config", config)
    refuse_outside_family(config, CLIP_FIXED, path, CLIP_REQUIRED)
    if config["intermediate_size"] % config["hidden_size"]:
        raise ValueError(f"{path}/config.json: intermediate_size {config['intermediate_size']} is not a multiple of "
                         f"hidden_size {config['hidden_size']}")
    return dict(vocab_size=config["vocab_size"], context_length=config.get("max_position_embeddings", 77),
                width=config["hidden_size"], depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                mlp_ratio=config["intermediate_size"] // config["hidden_size"], eps=config.get("layer_norm_eps", 1e-5))


# network (ref.text_to_image.Networks' field) -> (its folder in a pipeline, the class its config names, config reader,
# the class here)
FOLDER_NETWORKS = {
    "unet": ("unet", "UNet2DConditionModel", unet_arguments, UNet),
    "autoencoder": ("vae", "AutoencoderKL", vae_arguments, vae.AutoencoderKL),
    "text_encoder": ("text_encoder", "CLIPTextModel", clip_arguments, clip.CLIPTextModel),
    "controlnet": (".", "ControlNetModel", unet_arguments, ControlNet),
}


def config_class(config):
    """The class a config.json is for: diffusers' _class_name, transformers' architectures[0]."""
    return config.get("_class_name") or (config.get("architectures") or [None])[0]


def folder_builds(sd15, controlnet):
    """The networks that a diffusers pipeline folder `sd15` and a ControlNet folder `controlnet` describe in their
    config.json, as {network: build} (a build makes the network when called); networks read from single files or
    from folders without config.json are not in it (their presets build them). A config for another class (an SDXL
    text_encoder_2's CLIPTextModelWithProjection, a UNet where a ControlNet belongs) is refused naming it."""
    folders = {name: Path(sd15) / folder for name, (folder, *_) in FOLDER_NETWORKS.items() if name != "controlnet"}
    folders["controlnet"] = Path(controlnet)
    builds = {}
    for name, folder in folders.items():
        config = read_config(folder) if folder.is_dir() else None
        if config is None:
            continue
        _, expected, arguments, network = FOLDER_NETWORKS[name]
        if config_class(config) not in (None, expected):
            raise ValueError(f"{folder}/config.json is for a {config_class(config)}; a {expected} was expected there")
        builds[name] = functools.partial(network, **arguments(config, folder))
    return builds


def weights_path(path, variant=None):
    """The weights of `path`: a model folder's file or shard index (ref.checkpoints.folder_weights, `variant` choosing
    among its files), or the file itself; a variant given with a file is refused."""
    if Path(path).is_dir():
        return folder_weights(path, variant)
    if variant is not None:
        raise ValueError(f"{path} is a file; a variant ({variant}) chooses among the files of a diffusers model folder")
    return path
