"""InnerControl at SD1.5 scale: the runs of ref.trainer.fit (train.py) that train a readout probe on SD1.5's decoder
features and a ControlNet on the frozen SD1.5 with Eq. 8, on (image, control, caption) folders (ref/control_data.py).

    sd-probe       the readout probe H (ref/probes.py) on the frozen SD1.5: noised real latents at random t, one UNet
                   pass, H regresses the control from the decoder features (the alignment loss of Eq. 7 with H
                   trainable); Adam lr 1e-3, batch 8, 5k steps (10k for edges), Readout Guidance's settings
    sd-controlnet  a ControlNet (initialised from the UNet's encoder, or from a ControlNet file / an earlier run) on the
                   frozen VAE, CLIP text encoder and UNet, trained by ref.innercontrol.innercontrol_training_step:
                   the diffusion loss, + alpha x the reward of D on the decoded one-step x0 (Eq. 5-6) over the reward
                   range, + beta x the alignment of the frozen probe over the alignment range (Eq. 7); Table 4's
                   settings per task unless given; AdamW lr 1e-5 and weight decay 1e-2, global batch 256
                   (grad_accumulation micro-batches a rank), gradient clip 1, EMA; no caption dropout.
Latents: the VAE's posterior sample (its noise from the sample's own generator) times 0.18215; the reward decodes the
one-step estimate through the VAE decoder with gradients (recomputed in the backward pass with gradient_checkpointing)
to RGB in [0, 1] for D: DPT-Hybrid for depth, the HED annotator for hed, the LineArt annotator for lineart, a
TorchScript segmenter for segmentation (ref/dpt.py, ref/hed.py, ref/lineart.py, ref/segmenter.py, each with its own
preprocessing).
With gradient_checkpointing the UNet's and the ControlNet's blocks are recomputed in the backward pass too.

Named configs (`SD_CONFIGS`, train.py --config NAME): sd15-probe, sd15-controlnet (plain fine-tune, the first stage)
and sd15-innercontrol (Eq. 8, continuing from the fine-tune's EMA weights). sd_size "tiny" builds small parts of the
same layout for the tests.
"""
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ref import sd_checkpoints
from ref.checkpoints import read_checkpoint
from ref.clip import MODELS as TEXT_ENCODERS
from ref.configs import RUN_DEFAULTS, TRAINING_FIELDS
from ref.control_data import LABEL_TASKS, ControlDataset, collate_controls
from ref.controlnet import ControlNet
from ref.dpt import DPTDepth
from ref.hed import HEDAnnotator
from ref.innercontrol import (EQ8_FIELDS, OLD_EQ8_FIELDS, InnerControlTerms, alignment_loss, eq8_weights,
                              innercontrol_task, innercontrol_training_step)
from ref.lineart import LineArtAnnotator
from ref.losses import drop_captions
from ref.probes import ReadoutProbe, is_release_align_model, release_align_model
from ref.runtime import check_job, load_trained_network, move_modules, read_run_checkpoint
from ref.schedules import DDPMSchedule
from ref.segmenter import TorchScriptSegmenter
from ref.tokenizer import CLIPTokenizer
from ref.unet import CONFIGS as UNET_CONFIGS
from ref.unet import TAP_MODES, UNet
from ref.vae import MODELS as AUTOENCODERS

# The parts of one model size: UNet keywords, VAE and text-encoder presets (tiny: the same layout, for the tests).
SD_SIZES = {
    "sd15": dict(unet=UNET_CONFIGS["sd15"], vae="sd", text_encoder="clip-vit-l14"),
    "tiny": dict(unet=dict(UNET_CONFIGS["tiny"], in_channels=4), vae="tiny", text_encoder="clip-tiny"),
}
EDGE_TASKS = ("hed", "lineart")


# ---------------------------------------------------------------------------------------------------------------------
# The frozen Stable Diffusion: latents in, eps out, latents decoded for the reward model
# ---------------------------------------------------------------------------------------------------------------------

class StableDiffusion(nn.Module):
    """The frozen UNet, VAE and CLIP text encoder. `text_encoder(tokens)` and `unet(...)` are what
    innercontrol_training_step calls; `encode` and `decode` map images to scaled latents and back."""

    def __init__(self, unet, vae, text_encoder, checkpoint_decode=False):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.checkpoint_decode = checkpoint_decode
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def encode(self, images, draws):
        """images (B, 3, S, S) in [-1, 1] -> latents (B, 4, S/8, S/8): a posterior sample (each sample's noise from
        its own generator) times the scaling factor (0.18215 for SD)."""
        return self.vae.posterior_sample(*self.vae.encode(images), draws) * self.vae.scaling_factor

    def decode(self, latents):
        """Scaled latents -> RGB in [0, 1] (ControlNet++'s `(image / 2 + 0.5).clamp(0, 1)`), differentiable; with
        checkpoint_decode the decoder's activations are recomputed in the backward pass instead of kept."""
        latents = latents / self.vae.scaling_factor
        if self.checkpoint_decode and torch.is_grad_enabled():
            image = checkpoint(self.vae.decode, latents, use_reentrant=False)
        else:
            image = self.vae.decode(latents)
        return (image / 2 + 0.5).clamp(0, 1)  # (B, 3, S, S)


def stable_diffusion(config, load=True):
    """The frozen SD parts of a config's sd_size, loaded from its --sd15 single file (load False: untrained, on the
    default device, for the FLOP count on the meta device)."""
    size = SD_SIZES[config["sd_size"]] if config["sd_size"] in SD_SIZES else None
    if size is None:
        raise ValueError(f"unknown --sd-size {config['sd_size']!r}; choose one of {', '.join(SD_SIZES)}")
    checkpointing = config.get("gradient_checkpointing", False)
    if not load:
        return StableDiffusion(UNet(**size["unet"], gradient_checkpointing=checkpointing),
                               AUTOENCODERS[size["vae"]](), TEXT_ENCODERS[size["text_encoder"]](), checkpointing)
    if not config["sd15"]:
        raise ValueError(f"the {config['job']} job needs --sd15 FILE (an SD1.5 single file: v1-5-pruned-emaonly."
                         f"safetensors or .ckpt)")
    with torch.device("meta"):  # the file's tensors are taken as they are, no random init first
        unet = UNet(**size["unet"], gradient_checkpointing=checkpointing)
        text_encoder = TEXT_ENCODERS[size["text_encoder"]]()
    vae = AUTOENCODERS[size["vae"]]()
    sd_checkpoints.load_sd15(config["sd15"], unet, vae, text_encoder)
    return StableDiffusion(unet, vae, text_encoder, checkpointing)


def optional_path(text):
    """A path flag; "none" -> None (no file)."""
    return None if text.lower() == "none" else text


def required(config, field, what):
    if not config.get(field):
        raise ValueError(f"the {config['job']} job needs --{field.replace('_', '-')} ({what})")
    return config[field]


# ---------------------------------------------------------------------------------------------------------------------
# The fields and data shared by both runs
# ---------------------------------------------------------------------------------------------------------------------

SD_FIELDS = dict(
    TRAINING_FIELDS,
    sd_size=(str, "sd15 | tiny (tests): the sizes of UNet, VAE and text encoder"),
    sd15=(optional_path, "the SD1.5 single file (UNet, VAE, text encoder; its EMA UNet when it has one)"),
    tokenizer=(optional_path, "CLIP's BPE vocabulary: bpe_simple_vocab_16e6.txt.gz or a folder with vocab.json + "
                              "merges.txt"),
    data_path=(optional_path, "folder with metadata.jsonl: {\"image\", \"control\", \"caption\"[, \"hint\"]} a line"),
    task=(str, "depth | hed | lineart | segmentation (Table 4's column)"),
    image_size=(int, "training resolution S (512)"),
    resize=(str, "square: every file squashed to S x S (the InnerControl release) | crop: the short side resized to S, "
                 "then the central square"),
    num_classes=(int, "segmentation: classes of the label maps (ADE20K 150), 255 = no class"),
    label_dropout=(float, "probability of replacing a caption by the empty prompt (CFG training)"),
    grad_accumulation=(int, "micro-batches a rank's share of the batch is split into (the gradient stays the batch "
                            "mean's)"),
    gradient_checkpointing=(bool, "recompute the UNet's and ControlNet's blocks and the VAE decode of the reward term "
                                  "in the backward pass"),
)
PROBE_FIELDS = dict(
    tap_mode=(str, "decoder features the probe reads: conv | attn | auto (attn for depth, conv otherwise: the paper)"),
    probe_resolution=(int, "side R the feature maps are resized to (the 64 x 64 latent at 512 px)"),
    probe_upsample=(bool, "a transposed conv doubling the probe's output to 2R (default: on for hed / lineart)"),
    probe_width=(int, "the probe's projection width P (384)"),
)


class StableDiffusionRun:
    """What both runs share: the frozen SD parts, the schedule (SD1.5's scaled-linear betas, 1000 steps), the
    tokenizer, the task, the data folder. A run stored before `resize` existed cut its files by the centre crop."""
    added_fields = dict(resize="crop")

    def __init__(self, config, load=True):
        self.config = config
        self.task = innercontrol_task(config["task"])
        self.schedule = DDPMSchedule.named("scaled_linear")
        self.tokenizer = CLIPTokenizer.from_path(required(config, "tokenizer", "CLIP's BPE vocabulary"))
        self.base = stable_diffusion(config, load)

    def make_dataset(self):
        folder = required(self.config, "data_path", "a folder holding metadata.jsonl")
        return ControlDataset(folder, self.config["task"], self.config["image_size"], self.config["resize"])

    def collate(self, samples):
        return collate_controls(samples, self.tokenizer)

    def latents_and_tokens(self, batch, draws, device):
        """Caption dropout, then the posterior sample of each image, from each sample's generator. -> latents,
        tokens, hints, controls on the device."""
        images, hints, controls, tokens = batch
        empty_prompt = self.tokenizer([""])[0]  # (77,): what a dropped caption becomes
        tokens = drop_captions(tokens, empty_prompt, self.config["label_dropout"], draws)
        images, hints, controls, tokens = (tensor.to(device, non_blocking=True)
                                           for tensor in (images, hints, controls, tokens))
        return self.base.encode(images, draws), tokens, hints, controls

    def to(self, device):
        """The frozen partners (the networks among its attributes and its InnerControl terms) onto the device."""
        move_modules(device, self, getattr(self, "terms", self))
        return self


# ---------------------------------------------------------------------------------------------------------------------
# Probe training on SD1.5 features
# ---------------------------------------------------------------------------------------------------------------------

def probe_settings(config):
    """A probe config's tap mode and upsampling, `auto` / none resolved by the task as the paper does: attention
    features for depth, convolution features otherwise; the 2x upsampling head for thin edges.
    -> (tap_mode, upsample)"""
    tap_mode = config["tap_mode"]
    if tap_mode == "auto":
        tap_mode = "attn" if config["task"] == "depth" else "conv"
    upsample = config["probe_upsample"]
    return tap_mode, config["task"] in EDGE_TASKS if upsample is None else upsample


def build_probe(config, unet):
    """The readout probe of a probe config for `unet`'s decoder features: class logits for segmentation, tanh maps
    otherwise."""
    tap_mode, upsample = probe_settings(config)
    categorical = config["task"] in LABEL_TASKS
    return ReadoutProbe(unet.tap_channels(tap_mode), unet.emb_channels, config["num_classes"] if categorical else 1,
                        config["probe_resolution"], config["probe_width"],
                        output="logits" if categorical else "tanh", upsample=upsample)


def check_probe_base(path, probe_config, state, config, unet):
    """A probe trained for another base raises one ValueError naming what this one expects: another task, model size
    or class count than `config`'s, or feature maps (tap channels, time-embedding width) that `unet` does not have."""
    compared = ("task", "sd_size") + (("num_classes",) if config["task"] in LABEL_TASKS else ())
    for field in compared:
        if probe_config[field] != config[field]:
            raise ValueError(f"{path} is a probe for {field} {probe_config[field]!r}; {field} {config[field]!r} "
                             f"expected here")
    tap_mode, _ = probe_settings(probe_config)
    layers = sorted({int(key.split(".")[1]) for key in state if key.startswith("bottlenecks.")})
    found = [state[f"bottlenecks.{layer}.conv1.weight"].shape[1] for layer in layers]
    found_emb = state["bottlenecks.0.timestep_projection.weight"].shape[1] if layers else None
    expected = unet.tap_channels(tap_mode)
    if found != expected or found_emb != unet.emb_channels:
        raise ValueError(f"{path} is a probe for feature maps of {found} channels (time embedding {found_emb}); this "
                         f"UNet's {tap_mode} taps have {expected} (time embedding {unet.emb_channels}): a probe "
                         f"trained for another base")


def release_probe(path, contents, config, unet, load=True):
    """An align model of the InnerControl release (ref.probes.release_align_model) for `config`'s task on `unet`'s
    decoder features, read on the taps whose channels its bottlenecks take. The file names no task: what it can tell is
    checked, a tanh map given for segmentation, feature maps or a time embedding this UNet does not have are refused.
    -> (probe, tap_mode)"""
    if config["task"] in LABEL_TASKS:
        raise ValueError(f"{path} is an align model of the InnerControl release: a tanh control map, which the release "
                         f"trains for depth, hed and lineart only; {config['task']} needs a probe of class logits (an "
                         f"sd-probe run)")
    probe = release_align_model(contents, path, load)
    tap_mode = next((mode for mode in TAP_MODES if unet.tap_channels(mode) == probe.feature_channels), None)
    if tap_mode is None:
        raise ValueError(f"{path} is a release align model for feature maps of {probe.feature_channels} channels; this "
                         f"UNet's attn taps have {unet.tap_channels('attn')}, its conv taps "
                         f"{unet.tap_channels('conv')}: an align model for another base")
    if probe.t_emb_dim not in (None, unet.emb_channels):
        raise ValueError(f"{path} is a release align model that reads a {probe.t_emb_dim}-d time embedding; this "
                         f"UNet's is {unet.emb_channels}-d: an align model for another base")
    return probe, tap_mode


def trained_probe(path, config, unet, load=True):
    """The frozen EMA probe of an sd-probe run for `config`'s task and model size on `unet`'s decoder features, and
    its tap mode; a probe of another job or base is refused (check_probe_base). An align model of the InnerControl
    release is imported (release_probe). load False: untrained, the same checks. -> (probe, tap_mode)"""
    contents = read_checkpoint(path)
    if is_release_align_model(contents):
        return release_probe(path, contents, config, unet, load)
    checkpoint = read_run_checkpoint(path)
    check_job(checkpoint, "sd-probe", path)
    probe_config = checkpoint["args"]
    check_probe_base(path, probe_config, checkpoint["ema"], config, unet)
    if load:
        probe, _ = load_trained_network(path, "sd-probe", lambda settings: build_probe(settings, unet),
                                        checkpoint=checkpoint)
    else:
        probe = build_probe(probe_config, unet)
    return probe, probe_settings(probe_config)[0]


class ProbeRun(StableDiffusionRun):
    """sd-probe: H on the frozen SD1.5's decoder features of noised real latents at random t, regressing the input
    control with the task's probe comparison (probe_kind, in Eq. 7's form). Captions are dropped as in the
    ControlNet's training."""
    fields = dict(SD_FIELDS, **PROBE_FIELDS)

    def build(self):
        return build_probe(self.config, self.base.unet)

    def loss(self, net, batch, draws, device):
        tap_mode, _ = probe_settings(self.config)
        with torch.no_grad():
            x0, tokens, _, controls = self.latents_and_tokens(batch, draws, device)
            t = draws.randint(self.schedule.num_timesteps).to(device)  # (B,)
            x_t = self.schedule.add_noise(x0, draws.randn_like(x0), t)
            _, features = self.base.unet(x_t, t, self.base.text_encoder(tokens), taps=tap_mode)
            t_emb = self.base.unet.embed_time(t)  # (B, D_t)
        return alignment_loss(net, features, t_emb, controls, self.task.probe_kind)


# ---------------------------------------------------------------------------------------------------------------------
# ControlNet training with Eq. 8
# ---------------------------------------------------------------------------------------------------------------------

REWARD_TASKS = ("depth", "hed", "lineart", "segmentation")


def reward_model(config, load=True):
    """D of Eq. 6 for the config's task, frozen: DPT-Hybrid (depth), the HED annotator (hed), the LineArt annotator
    (lineart), a TorchScript segmenter (segmentation), from --reward-model. load False: untrained on the default
    device; the segmenter, a program that cannot run on the meta device, is then left out (None)."""
    task = config["task"]
    if not load:
        return None if task == "segmentation" else control_model(task, None)
    return control_model(task, required(config, "reward_model", f"the {task} reward model, for alpha > 0"),
                         config["num_classes"])


def control_model(task, path, num_classes=None, depth_model="dpt-hybrid-midas"):
    """The frozen model that reads a task's control from RGB in [0, 1], D of Eq. 6 and the evaluation models alike:
    DPT (depth: max-normalised relative depth; depth_model, a ref.dpt.DPT_CONFIGS preset: DPT-Hybrid the reward
    model, DPT-Large the releases' evaluation model), the HED annotator (hed: soft edges), the LineArt annotator
    (lineart: white lines on black), a TorchScript segmenter of num_classes classes (segmentation: logits). A file of
    another model is refused by name (ref.annotator_weights, ref.dpt); path None: random weights (not for
    segmentation)."""
    if task not in REWARD_TASKS:
        raise ValueError(f"this project has no {task} model; choose one of {', '.join(REWARD_TASKS)}")
    if task == "depth":
        return DPTDepth(path, depth_model)
    if task == "hed":
        return HEDAnnotator(path)
    if task == "lineart":
        return LineArtAnnotator(path)
    return TorchScriptSegmenter(path, num_classes)


class ControlNetRun(StableDiffusionRun):
    """sd-controlnet: the ControlNet on the frozen SD1.5 with Eq. 8. alpha, beta and the ranges default to the task's
    Table 4 column; alpha 0 / beta 0 leave the term (and its network) out: both 0 is the plain fine-tune."""
    fields = dict(
        SD_FIELDS,
        controlnet_init=(optional_path, "start from this ControlNet (a ControlNet 1.0 / 1.1 file, diffusers folder "
                                        "or an sd-controlnet run's latest.pt, its EMA weights); none: a copy of the "
                                        "UNet's encoder"),
        reward_model=(optional_path, "D for alpha > 0: DPT-Hybrid file (depth), ControlNetHED_Apache2.pth (hed), "
                                     "sk_model.pth (lineart), TorchScript segmenter (segmentation)"),
        probe=(optional_path, "the sd-probe run's latest.pt or an align model of the InnerControl release "
                              "(checkpoints/aligning/TASK.pt), for beta > 0"),
        **EQ8_FIELDS,
    )
    added_fields = dict(StableDiffusionRun.added_fields, **OLD_EQ8_FIELDS)

    def __init__(self, config, load=True):
        super().__init__(config, load)
        self.load = load
        settings = self.task
        alpha, beta, reward_range, align_range = eq8_weights(settings, config, self.schedule.num_timesteps)
        reward, probe, tap_mode = None, None, None
        if alpha:
            reward = reward_model(config, load)
        if beta:
            path = required(config, "probe", f"an sd-probe run of task {config['task']}, for beta > 0")
            probe, tap_mode = trained_probe(path, config, self.base.unet, load)
        self.terms = InnerControlTerms(alpha, reward, reward_range, settings.reward_kind, beta, probe, tap_mode,
                                       align_range, settings.alignment_kind, decode=self.base.decode,
                                       eq8_reduction=config["eq8_reduction"])

    def build(self):
        unet = self.base.unet
        controlnet = ControlNet.from_unet(unet, hint_channels=3, hint_downsampling=self.base.vae.downsampling_factor,
                                          gradient_checkpointing=self.config["gradient_checkpointing"])
        if self.config["controlnet_init"] and self.load:
            sd_checkpoints.load(controlnet, self.config["controlnet_init"])
        return controlnet

    def loss(self, net, batch, draws, device):
        latents, tokens, hints, controls = self.latents_and_tokens(batch, draws, device)
        return innercontrol_training_step(net, self.base, self.schedule, self.terms, latents, tokens, hints, controls,
                                          draws, device)


SD_RUNS = {"sd-probe": ProbeRun, "sd-controlnet": ControlNetRun}


# ---------------------------------------------------------------------------------------------------------------------
# Named configs (train.py --config NAME --task TASK --sd15 FILE --tokenizer FILE --data-path FOLDER ...)
# ---------------------------------------------------------------------------------------------------------------------

# The InnerControl release's data and optimiser where the paper is silent: files squashed to 512 x 512
# (`train/reward_control_aligned.py`:1184-1205), no caption dropout (its --text_condition_dropout, :947-951, default 0,
# unset by `train/aligned_depth.sh`, `aligned_hed.sh`, `aligned_linedrawing.sh`), AdamW weight decay 1e-2 (its
# --adam_weight_decay, :760, unset by the scripts; used at :1495).
_SD15 = dict(RUN_DEFAULTS, sd_size="sd15", sd15=None, tokenizer=None, data_path=None, task="depth", image_size=512,
             resize="square", num_classes=150, label_dropout=0.0, gradient_checkpointing=True, workers=4,
             checkpoint_every=500, log_every=10)
SD_CONFIGS = {
    # Readout Guidance / the paper's probe training: Adam lr 1e-3, batch 8, 5k steps (--steps 10000 for edges).
    "sd15-probe": dict(_SD15, job="sd-probe", tap_mode="auto", probe_resolution=64, probe_upsample=None,
                       probe_width=384, batch_size=8, grad_accumulation=1, steps=5000, lr=1e-3, ema_decay=0.999),
    # The plain fine-tune (diffusion loss only) of a pretrained ControlNet: AdamW lr 1e-5 (weight decay 1e-2, the
    # release's), global batch 256 (on 8 ranks, 4 micro-batches of 8 a rank), clip 1, 10k steps (--steps 5000 for
    # segmentation); EMA over ~1k steps.
    "sd15-controlnet": dict(_SD15, job="sd-controlnet", controlnet_init=None, reward_model=None, probe=None,
                            alpha=0.0, beta=0.0, reward_range=None, align_range=None, eq8_reduction="unbiased",
                            batch_size=256, grad_accumulation=4, steps=10_000, lr=1e-5, weight_decay=1e-2,
                            ema_decay=0.999),
}
# Eq. 8 for as many steps again, from the fine-tune's EMA weights, with Table 4's alpha, beta and ranges.
SD_CONFIGS["sd15-innercontrol"] = dict(SD_CONFIGS["sd15-controlnet"], alpha=None, beta=None,
                                       controlnet_init="runs/sd15-controlnet-{task}/latest.pt",
                                       probe="runs/sd15-probe-{task}/latest.pt")
