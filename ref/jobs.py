"""The kinds of training run (config field `job`), each as the pieces the one training loop (ref/training.py, `fit`)
needs: the trainable network, its frozen partners, the data, the per-sample random draws and the per-sample loss.

    dit         DiT / SiT with the IG head; flow matching (velocity) or DDPM eps, + lambda ||D_i - target||^2 (IG)
    unet        the text-conditioned UNet on shapes, DDPM eps: InnerControl's base model (pipeline step 1)
    estimator   a control estimator image -> depth / segmentation / edges: reward model or evaluation model (step 2)
    probe       the readout probe H on the frozen base UNet's decoder features at random t (step 3)
    controlnet  a ControlNet on the frozen base UNet: diffusion loss + alpha reward + beta alignment (Eq. 8; steps 4-5)

A job object: `make_dataset()`; `build()` the trainable network (random init from the seed, or a run's weights);
`collate(samples)` -> a tuple of CPU tensors; `draw(batch, draws)` -> the loss inputs with each sample's random draws
(from ref.training.SampleDraws, always in the order: condition dropout, t, noise); `to(device)` moves the frozen
partners; `loss(net, *inputs)` -> (B,) per-sample loss. Frozen partners are other runs' EMA weights (`load_trained`).
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.checkpoints import check_state_fits, read_checkpoint
from ref.control_models import ControlEstimator
from ref.controlnet import ControlNet
from ref.data import CAPTION_VOCABULARY, MAX_OBJECTS, SHAPE_CLASSES, ImageFolder, LatentShards, Shapes
from ref.dit import DiT
from ref.losses import (alignment_loss, control_loss, ddpm_eps_loss, drop_labels, flow_matching_loss,
                        innercontrol_loss, innercontrol_task, mean_squared_error, range_probability,
                        reward_loss)
from ref.probes import ReadoutProbe
from ref.schedules import DDPMSchedule
from ref.text import PAD, TextEncoder, Tokenizer
from ref.unet import MODELS as UNETS

LATENT_CHANNELS, LATENT_DOWNSAMPLING = 4, 8  # SD-VAE: 256 px image -> (4, 32, 32) latent


# ---------------------------------------------------------------------------------------------------------------------
# Loading the trained networks of other runs
# ---------------------------------------------------------------------------------------------------------------------

def read_run_checkpoint(path):
    """A checkpoint written by train.py: {model, ema, opt, step, args}, args the config with its `job`. Anything
    else (a missing, truncated or foreign file) raises ValueError naming the file."""
    checkpoint = read_checkpoint(path)
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), dict)
            and checkpoint["args"].get("job") in JOBS):
        raise ValueError(f"{path} is not a checkpoint written by train.py (no config with a known job under 'args')")
    return checkpoint


def check_job(checkpoint, expected_job, path):
    """A train.py checkpoint of another job than `expected_job` raises ValueError naming both."""
    if checkpoint["args"]["job"] != expected_job:
        raise ValueError(f"{path} is a {checkpoint['args']['job']!r} run; a {expected_job!r} run was expected here")


def load_trained(path, expected_job, weights="ema", checkpoint=None, load=True):
    """The network a train.py run trained, with its `weights` ("ema" or "model"), frozen, on the CPU, and its
    config. checkpoint: the file's contents when the caller has read them already. A run of another job than
    `expected_job` raises ValueError. load False: the same architecture untrained, on the default device (what a
    job built on the meta device needs of its partners: load_trained itself and the FLOP count build so)."""
    checkpoint = read_run_checkpoint(path) if checkpoint is None else checkpoint
    check_job(checkpoint, expected_job, path)
    config = checkpoint["args"]
    if not load:
        return JOBS[expected_job](config, load=False).build(), config
    with torch.device("meta"):  # no random init of weights that are overwritten next
        network = JOBS[expected_job](config, load=False).build()
    check_state_fits(network, checkpoint[weights], {key: key for key in checkpoint[weights]})
    network.load_state_dict(checkpoint[weights], assign=True)
    return network.requires_grad_(False).eval(), config


# ---------------------------------------------------------------------------------------------------------------------
# DiT / SiT with the IG head
# ---------------------------------------------------------------------------------------------------------------------

def network_input_shape(config):
    """(C, H, W) of what the DiT sees: RGB pixels in [-1, 1], or scaled SD-VAE latents at 1/8 of the image side."""
    if config["data"] == "latents":
        side = config["image_size"] // LATENT_DOWNSAMPLING
        return LATENT_CHANNELS, side, side
    return 3, config["image_size"], config["image_size"]


def collate_inputs_labels(samples):
    """Every dataset puts (input, label) first -> x (N, C, H, W), y (N,) long."""
    return torch.stack([sample[0] for sample in samples]), torch.tensor([sample[1] for sample in samples])


class DiTJob:
    def __init__(self, config, load=True):
        self.config = config
        if config["objective"] not in ("flow", "eps"):
            raise ValueError(f"unknown objective {config['objective']!r}; choose flow or eps")
        self.schedule = DDPMSchedule.named(config["beta_schedule"]) if config["objective"] == "eps" else None

    def make_dataset(self):
        """The training data; bad input (missing, empty or malformed folders and shards, more classes than the
        config has) raises ValueError naming the file or setting."""
        config = self.config
        if config["data"] == "shapes":
            dataset, classes = Shapes(config["image_size"], num_items=config["shapes_items"]), len(SHAPE_CLASSES)
        elif config["data"] in ("images", "latents"):
            if not config["data_path"]:
                raise ValueError(f"--data {config['data']} needs --data-path")
            if config["data"] == "images":
                dataset = ImageFolder(config["data_path"], config["image_size"], flip=config["flip"])
                classes = len(dataset.classes)
            else:
                dataset = LatentShards(config["data_path"], network_input_shape(config))
                classes = int(dataset.labels.max()) + 1
        else:
            raise ValueError(f"unknown data {config['data']!r}; choose shapes, images or latents")
        if classes > config["num_classes"]:
            raise ValueError(f"the data has {classes} classes but the config {config['num_classes']}; "
                             f"set --num-classes")
        return dataset

    def build(self):
        """The DiT / SiT of the config (learned sigma off: both objectives regress one prediction)."""
        config = self.config
        channels, side, _ = network_input_shape(config)
        return DiT(input_size=side, patch_size=config["patch_size"], in_channels=channels,
                   hidden_size=config["hidden_size"], depth=config["depth"], num_heads=config["num_heads"],
                   num_classes=config["num_classes"], class_dropout_prob=config["label_dropout"],
                   intermediate_block=config["intermediate_block"],
                   gradient_checkpointing=config["gradient_checkpointing"])

    collate = staticmethod(collate_inputs_labels)

    def draw(self, batch, draws):
        """The label dropped to the null label with probability label_dropout, then t, then the noise."""
        x, y = batch
        y = torch.cat([drop_labels(label[None], self.config["label_dropout"], self.config["num_classes"], generator)
                       for label, generator in zip(y, draws.generators)])  # (N,), null label = num_classes
        t = draws.rand() if self.schedule is None else draws.randint(self.schedule.num_timesteps)  # U(0,1) / U{0..T-1}
        return x, y, t, draws.randn(*x.shape[1:])  # eps (N, C, H, W)

    def to(self, device):
        return self

    def loss(self, net, x, y, t, eps):
        if self.schedule is None:
            return flow_matching_loss(net, x, t, y, eps, self.config["aux_weight"])
        return ddpm_eps_loss(net, self.schedule, x, t, y, eps, self.config["aux_weight"])


# ---------------------------------------------------------------------------------------------------------------------
# The InnerControl pipeline on shapes: tasks, the text-conditioned UNet
# ---------------------------------------------------------------------------------------------------------------------

CAPTION_TOKENIZER = Tokenizer(CAPTION_VOCABULARY, max_length=4 * MAX_OBJECTS - 1)  # "a red circle and a ..."


@dataclass(frozen=True)
class ShapesTask:
    """A control of the shapes data and how every stage handles it.

    channels: output channels of the probe and the estimators (1 map, or one logit per segment class).
    hint_channels: channels of the ControlNet's input control (segmentation: one-hot).
    table4: the column of Table 4 (ref.losses.INNERCONTROL_TASKS) giving alpha, beta, ranges and comparisons; shapes
        edges are soft occluding contours, so they take HED's column (sparse MSE alignment).
    The probe and the estimators are trained with the alignment comparison (maps in [0, 1] or class indices)."""
    channels: int
    hint_channels: int
    table4: str

    @property
    def settings(self):
        return innercontrol_task(self.table4)

    @property
    def categorical(self):
        return self.settings.alignment_kind == "cross_entropy"


SEGMENT_CLASSES = 1 + len(SHAPE_CLASSES)  # background and one segment class per shape class
SHAPES_TASKS = {
    "depth": ShapesTask(channels=1, hint_channels=1, table4="depth"),
    "segmentation": ShapesTask(channels=SEGMENT_CLASSES, hint_channels=SEGMENT_CLASSES, table4="segmentation"),
    "edges": ShapesTask(channels=1, hint_channels=1, table4="hed"),
}


def shapes_task(name):
    if name not in SHAPES_TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(SHAPES_TASKS)}")
    return SHAPES_TASKS[name]


def control_of(sample, task_name):
    """The exact control of a ShapesSample: depth (1, H, W) or edges (1, H, W) in [0, 1], segmentation (H, W) long."""
    return getattr(sample, task_name)


def hint_of(control, task_name):
    """The ControlNet's input control: the map itself, or the segmentation one-hot. (B, C_hint, H, W) float"""
    if task_name == "segmentation":
        return F.one_hot(control, SEGMENT_CLASSES).permute(0, 3, 1, 2).float()
    return control


SEGMENT_PALETTE = np.array([[40, 40, 40], [230, 60, 60], [60, 200, 80], [70, 110, 240], [240, 220, 50],
                            [220, 80, 220]], dtype=np.uint8)  # background, then one colour per shape class


def control_picture(control, task_name):
    """A control as an RGB picture (H, W, 3) uint8: depth and edges in grey, segments in SEGMENT_PALETTE."""
    if task_name == "segmentation":
        return SEGMENT_PALETTE[control.numpy()]
    grey = (255 * control[0]).round().clamp(0, 255).to(torch.uint8).numpy()  # (H, W)
    return np.repeat(grey[:, :, None], 3, axis=2)


def collate_shapes(samples, task_name=None):
    """ShapesSamples -> image (B, 3, H, W), caption tokens (B, L), and with a task its control."""
    images = torch.stack([sample.image for sample in samples])
    tokens = CAPTION_TOKENIZER([sample.caption for sample in samples])
    if task_name is None:
        return images, tokens
    return images, tokens, torch.stack([control_of(sample, task_name) for sample in samples])


def drop_captions(tokens, probability, draws):
    """Caption dropout for CFG: each caption becomes the empty one (all padding) with the given probability."""
    drop = torch.cat([torch.rand(1, generator=generator) < probability for generator in draws.generators])  # (B,)
    return torch.where(drop[:, None], torch.full_like(tokens, PAD), tokens)


class TextToImage(nn.Module):
    """The base model: the UNet reading the caption through the text encoder (SD's UNet + CLIP text encoder).
    forward(x, t, tokens, control=None, taps=None) is the UNet's, with tokens (B, L) for the context."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x, t, tokens, control=None, taps=None):
        return self.unet(x, t, self.text_encoder(tokens), control=control, taps=taps)


class ShapesJob:
    """What the pipeline's jobs share: shapes data at the config's size, the DDPM schedule, the task."""

    def __init__(self, config, load=True):
        self.config = config
        self.schedule = DDPMSchedule.named(config["beta_schedule"])
        self.task_name = config.get("task")
        self.task = None if self.task_name is None else shapes_task(self.task_name)

    def make_dataset(self):
        if self.config["data"] != "shapes":
            raise ValueError(f"the {self.config['job']} job trains on shapes only (got --data {self.config['data']})")
        return Shapes(self.config["image_size"], num_items=self.config["shapes_items"])

    def collate(self, samples):
        return collate_shapes(samples, self.task_name)

    def noise(self, x0, draws):
        """t ~ U{0..T-1}, then eps, per sample."""
        return draws.randint(self.schedule.num_timesteps), draws.randn(*x0.shape[1:])

    def to(self, device):
        for name, value in vars(self).items():
            if isinstance(value, nn.Module):
                setattr(self, name, value.to(device))
        return self


class UNetJob(ShapesJob):
    """Step 1: the base text-to-image model, eps prediction, captions dropped with probability label_dropout."""

    def collate(self, samples):
        return collate_shapes(samples)  # images and captions; no control

    def build(self):
        unet = UNETS[self.config["unet"]](in_channels=3)
        context_dim = unet.encoder_config["context_dim"]
        return TextToImage(unet, TextEncoder(len(CAPTION_TOKENIZER), CAPTION_TOKENIZER.max_length, context_dim))

    def draw(self, batch, draws):
        images, tokens = batch
        tokens = drop_captions(tokens, self.config["label_dropout"], draws)
        return (images, tokens, *self.noise(images, draws))

    def loss(self, net, x0, tokens, t, eps):
        return mean_squared_error(net(self.schedule.add_noise(x0, eps, t), t, tokens), eps)


class EstimatorJob(ShapesJob):
    """Step 2: a control estimator on (image, exact control) pairs; width = hidden_size, blocks per level = depth."""

    def build(self):
        output = "logits" if self.task.categorical else "sigmoid"
        return ControlEstimator(self.task.channels, self.config["hidden_size"], self.config["depth"], output)

    def draw(self, batch, draws):
        images, _, control = batch
        return images, control

    def loss(self, net, images, control):
        return control_loss(net(images), control, self.task.settings.alignment_kind)


def required_run(config, field, role):
    if not config.get(field):
        raise ValueError(f"the {config['job']} job needs --{field.replace('_', '-')} RUN/latest.pt ({role})")
    return config[field]


class ProbeJob(ShapesJob):
    """Step 3: the readout probe on the frozen base UNet's decoder features (tap mode `tap_mode`) of noised real
    images at random t, regressing the control (the alignment loss of Eq. 7 with the probe trainable); its width P is
    hidden_size. Captions are dropped as in the ControlNet's training, so the probe knows the features of both."""

    def __init__(self, config, load=True):
        super().__init__(config, load)
        self.base, _ = load_trained(required_run(config, "base", "the base UNet run"), "unet", load=load)

    def build(self):
        unet = self.base.unet
        return ReadoutProbe(unet.tap_channels(self.config["tap_mode"]), unet.emb_channels,
                            self.task.channels, self.config["image_size"], self.config["hidden_size"],
                            output="logits" if self.task.categorical else "tanh")

    def draw(self, batch, draws):
        images, tokens, control = batch
        tokens = drop_captions(tokens, self.config["label_dropout"], draws)
        return (images, tokens, control, *self.noise(images, draws))

    def loss(self, net, x0, tokens, control, t, eps):
        with torch.no_grad():
            _, features = self.base(self.schedule.add_noise(x0, eps, t), t, tokens, taps=self.config["tap_mode"])
            t_emb = self.base.unet.embed_time(t)
        return alignment_loss(net, features, t_emb, control, self.task.settings.alignment_kind)


class ControlNetJob(ShapesJob):
    """Steps 4-5: a ControlNet (initialised from the base UNet's encoder, or from the run `init`) on the frozen base,
    trained with Eq. 8: the diffusion loss, + alpha x the reward of `reward_model` on the one-step estimate over
    reward_range, + beta x the alignment of the frozen `probe` over align_range. alpha, beta and the ranges default to
    the task's Table 4 column; alpha 0 / beta 0 leave the term (and its network) out."""

    def __init__(self, config, load=True):
        super().__init__(config, load)
        self.load = load
        settings = self.task.settings
        self.alpha = settings.alpha if config["alpha"] is None else config["alpha"]
        self.beta = settings.beta if config["beta"] is None else config["beta"]
        self.reward_range = tuple(config["reward_range"] or settings.reward_range)
        self.align_range = tuple(config["align_range"] or settings.align_range)
        for weight, t_range in ((self.alpha, self.reward_range), (self.beta, self.align_range)):
            if weight:
                range_probability(t_range, self.schedule.num_timesteps)  # a range holding no step is refused here
        self.base, _ = load_trained(required_run(config, "base", "the base UNet run"), "unet", load=load)
        self.reward_model = self.probe = None
        if self.alpha:
            path = required_run(config, "reward_model", f"an estimator run of task {self.task_name}, for alpha > 0")
            self.reward_model, _ = self.partner(path, "estimator", load)
        if self.beta:
            path = required_run(config, "probe", f"a probe run of task {self.task_name}, for beta > 0")
            self.probe, probe_config = self.partner(path, "probe", load)
            self.tap_mode = probe_config["tap_mode"]
            check_probe_fits(self.probe, self.base.unet, self.tap_mode, path)

    def partner(self, path, job, load):
        """A frozen network of another run, of this task, and its config."""
        network, config = load_trained(path, job, load=load)
        if config["task"] != self.task_name:
            raise ValueError(f"{path} is a {job} run for the task {config['task']!r}; this run's task is "
                             f"{self.task_name!r}")
        return network, config

    def build(self):
        controlnet = ControlNet.from_unet(self.base.unet, hint_channels=self.task.hint_channels, hint_downsampling=1)
        if self.config["init"] and self.load:
            checkpoint = read_run_checkpoint(self.config["init"])
            check_job(checkpoint, "controlnet", self.config["init"])
            check_state_fits(controlnet, checkpoint["model"], {key: key for key in checkpoint["model"]})
            controlnet.load_state_dict(checkpoint["model"])
        return controlnet

    def draw(self, batch, draws):
        images, tokens, control = batch
        tokens = drop_captions(tokens, self.config["label_dropout"], draws)
        return (images, tokens, hint_of(control, self.task_name), control, *self.noise(images, draws))

    def loss(self, net, x0, tokens, hint, control, t, eps):
        settings = self.task.settings
        x_t = self.schedule.add_noise(x0, eps, t)
        with torch.no_grad():
            context = self.base.text_encoder(tokens)  # (B, L, D_ctx)
        residuals = net(x_t, hint, t, context)
        if self.probe is None:
            eps_hat, features = self.base.unet(x_t, t, context, control=residuals), None
        else:
            eps_hat, features = self.base.unet(x_t, t, context, control=residuals, taps=self.tap_mode)
        reward = alignment = None
        if self.reward_model is not None:  # Eq. 5-6
            reward = reward_loss(self.reward_model, self.schedule, x_t, eps_hat, t, control, settings.reward_kind)
        if self.probe is not None:  # Eq. 7
            alignment = alignment_loss(self.probe, features, self.base.unet.embed_time(t), control,
                                       settings.alignment_kind)
        return innercontrol_loss(mean_squared_error(eps_hat, eps), reward, alignment, t, self.alpha, self.beta,
                                 self.reward_range, self.align_range, self.schedule.num_timesteps)  # Eq. 8


def check_probe_fits(probe, unet, tap_mode, path):
    """A probe trained on another UNet's features cannot read this one's: name what it expects and what it gets."""
    channels, t_emb_dim = unet.tap_channels(tap_mode), unet.emb_channels
    if probe.feature_channels != channels or probe.t_emb_dim != t_emb_dim:
        raise ValueError(f"probe {path} was trained on {len(probe.feature_channels)} '{tap_mode}' feature maps with "
                         f"channels {probe.feature_channels} and a timestep embedding of width "
                         f"{probe.t_emb_dim}; this base UNet gives {len(channels)} maps with channels "
                         f"{channels} and width {t_emb_dim}")


JOBS = {"dit": DiTJob, "unet": UNetJob, "estimator": EstimatorJob, "probe": ProbeJob, "controlnet": ControlNetJob}


def make_job(config, load=True):
    if config["job"] not in JOBS:
        raise ValueError(f"unknown job {config['job']!r}; choose one of {', '.join(JOBS)}")
    return JOBS[config["job"]](config, load)
