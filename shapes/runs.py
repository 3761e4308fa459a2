"""The testbed's kinds of run (config field `job`) for ref.trainer.fit, and its named configs:

    dit         the IG run (ref/internal_guidance.py) on shapes scenes as well as image folders and latents
    unet        the text-conditioned UNet on shapes, DDPM eps: InnerControl's base model (pipeline step 1)
    estimator   a control estimator image -> depth / segmentation / edges: reward model or evaluation model (step 2)
    probe       the readout probe H on the frozen base UNet's decoder features at random t (step 3)
    controlnet  a ControlNet on the frozen base UNet, trained by ref.innercontrol.innercontrol_training_step
                (diffusion loss + alpha reward + beta alignment, Eq. 8; steps 4-5)

Each run gives what the loop needs (ref/trainer.py): `make_dataset()`, `build()`, `collate(samples)`, `to(device)`,
`loss(net, batch, draws, device)` -> (B,). Frozen partners are other runs' EMA weights (`load_trained`).
"""
import torch

from ref.checkpoints import check_state_fits
from ref.configs import DIT_DEFAULTS, RUN_DEFAULTS, TRAINING_FIELDS
from ref.controlnet import ControlNet
from ref.control_losses import control_loss
from ref.innercontrol import (EQ8_FIELDS, OLD_EQ8_FIELDS, InnerControlTerms, alignment_loss, eq8_weights,
                              innercontrol_training_step)
from ref.internal_guidance import DiTRun
from ref.losses import check_t_draw, ddpm_timesteps, mean_squared_error
from ref.probes import ReadoutProbe
from ref.runtime import check_job, load_trained_network, move_modules, read_run_checkpoint
from ref.schedules import DDPMSchedule
from ref.unet import MODELS as UNETS
from shapes.control_models import ControlEstimator
from shapes.data import MAX_OBJECTS, SHAPE_CLASSES, Shapes
from shapes.pipeline import CAPTION_TOKENIZER, TextToImage, collate_shapes, drop_captions, hint_of, shapes_task
from shapes.text import TextEncoder


OLD_SCENES = dict(shapes_max_objects=MAX_OBJECTS)  # the added_fields of runs from before the field: up to 3 objects


# ---------------------------------------------------------------------------------------------------------------------
# Loading the trained networks of other runs
# ---------------------------------------------------------------------------------------------------------------------

def load_trained(path, expected_job, weights="ema", checkpoint=None, load=True):
    """The network a train.py run trained, with its `weights` ("ema" or "model"), frozen, on the CPU, and its
    config (`trained_config`). checkpoint: the file's contents when the caller has read them already. A run of another
    job than `expected_job` raises ValueError. load False: the same architecture untrained, on the default device
    (what a run built on the meta device needs of its partners: the FLOP count builds so)."""
    def build(config):
        return RUNS[expected_job](dict(RUNS[expected_job].added_fields, **config), load=False).build()
    if load:
        network, config = load_trained_network(path, expected_job, build, weights, checkpoint)
        return network, dict(RUNS[expected_job].added_fields, **config)
    config = trained_config(path, expected_job, checkpoint)
    return build(config), config


def trained_config(path, expected_job, checkpoint=None):
    """The config of a train.py run of `expected_job` (another job: ValueError), holding the old default of every
    field the run's kind gained after the checkpoint was written."""
    checkpoint = read_run_checkpoint(path) if checkpoint is None else checkpoint
    check_job(checkpoint, expected_job, path)
    return dict(RUNS[expected_job].added_fields, **checkpoint["args"])


# ---------------------------------------------------------------------------------------------------------------------
# The IG run on shapes scenes
# ---------------------------------------------------------------------------------------------------------------------

class ShapesDiTRun(DiTRun):
    """DiTRun with one more source of data: --data shapes, labelled by the front object's class."""
    fields = dict(DiTRun.fields,
                  data=(str, "shapes (procedural, 3 x S x S pixels) | images (folder <class>/<image>) | latents "
                             "(SD-VAE shards)"),
                  shapes_items=(int, "shapes: epoch length (scenes are rendered from their index, so any length is "
                                     "free)"),
                  shapes_max_objects=(int, f"shapes: at most this many objects a scene (1..{MAX_OBJECTS}; 1: one "
                                           f"object on the ground plane)"))
    added_fields = OLD_SCENES

    def dataset_and_classes(self):
        config = self.config
        if config["data"] == "shapes":
            dataset = Shapes(config["image_size"], num_items=config["shapes_items"],
                             max_objects=config["shapes_max_objects"])
            return dataset, len(SHAPE_CLASSES)
        return super().dataset_and_classes()


# ---------------------------------------------------------------------------------------------------------------------
# The InnerControl pipeline's runs
# ---------------------------------------------------------------------------------------------------------------------

PIPELINE_FIELDS = {  # the InnerControl pipeline's fields; each run declares those it reads
    "image_size": (int, "image side in pixels"),
    "shapes_items": (int, "epoch length (scenes are rendered from their index, so any length is free)"),
    "shapes_max_objects": (int, f"at most this many objects a scene (1..{MAX_OBJECTS}; 1: one object on the ground "
                                f"plane)"),
    "beta_schedule": (str, "DDPM betas (linear, scaled_linear, cosine), 1000 steps"),
    "label_dropout": (float, "probability of replacing a caption by the empty one (CFG training)"),
    "t_distribution": DiTRun.fields["t_distribution"],
    "t_location": DiTRun.fields["t_location"],
    "unet": (str, "the ref/unet.py preset of the base UNet (pixel space, 3 channels)"),
    "task": (str, "depth | segmentation | edges"),
    "depth": (int, "residual blocks per level"),
    "hidden_size": (int, "estimator: channels at full resolution; probe: projection width P"),
    "tap_mode": (str, "decoder features the probe reads, conv (ResBlocks) | attn (self-attention outputs)"),
    "base": (str, "the base UNet run's latest.pt (its EMA weights, frozen)"),
    "probe": (str, "the probe run's latest.pt, for the alignment term (beta > 0)"),
    "reward_model": (str, "the reward estimator run's latest.pt, for the reward term (alpha > 0)"),
    "init": (str, "start from this controlnet run's weights (Eq. 8 after the plain fine-tune)"),
    **EQ8_FIELDS,
}


def pipeline_fields(*names):
    """The fields of a pipeline run: the training fields, the scenes and the schedule, and `names`."""
    return dict(TRAINING_FIELDS, **{name: PIPELINE_FIELDS[name]
                                    for name in ("image_size", "shapes_items", "shapes_max_objects", "beta_schedule",
                                                 *names)})


class ShapesRun:
    """What the pipeline's runs share: shapes data at the config's size, the DDPM schedule, the task."""
    added_fields = OLD_SCENES

    def __init__(self, config, load=True):
        self.config = config
        self.schedule = DDPMSchedule.named(config["beta_schedule"])
        self.task_name = config.get("task")
        self.task = None if self.task_name is None else shapes_task(self.task_name)

    def make_dataset(self):
        return Shapes(self.config["image_size"], num_items=self.config["shapes_items"],
                      max_objects=self.config["shapes_max_objects"])

    def collate(self, samples):
        return collate_shapes(samples, self.task_name)

    def timesteps(self, draws):
        return ddpm_timesteps(draws, self.schedule.num_timesteps)  # t ~ U{0..T-1}

    def noised(self, images, tokens, draws, device):
        """Caption dropout, then t (`timesteps`), then eps, per sample; on the device: images, tokens, t, eps."""
        tokens = drop_captions(tokens, self.config["label_dropout"], draws)
        t, eps = self.timesteps(draws), draws.randn(*images.shape[1:])
        return (tensor.to(device, non_blocking=True) for tensor in (images, tokens, t, eps))

    def to(self, device):
        """The frozen partners (the networks among its attributes and its InnerControl terms) onto the device."""
        move_modules(device, self, getattr(self, "terms", self))
        return self


class UNetRun(ShapesRun):
    """Step 1: the base text-to-image model, eps prediction, captions dropped with probability label_dropout, t from
    t_distribution (uniform as DDPM, or logit-normal binned onto the steps)."""
    fields = pipeline_fields("unet", "label_dropout", "t_distribution", "t_location")
    added_fields = dict(OLD_SCENES, t_distribution="uniform", t_location=0.0)

    def __init__(self, config, load=True):
        super().__init__(config, load)
        check_t_draw(config)

    def timesteps(self, draws):
        return ddpm_timesteps(draws, self.schedule.num_timesteps, self.config["t_distribution"],
                              self.config["t_location"])

    def collate(self, samples):
        return collate_shapes(samples)  # images and captions; no control

    def build(self):
        unet = UNETS[self.config["unet"]](in_channels=3)
        context_dim = unet.encoder_config["context_dim"]
        return TextToImage(unet, TextEncoder(len(CAPTION_TOKENIZER), CAPTION_TOKENIZER.max_length, context_dim))

    def loss(self, net, batch, draws, device):
        x0, tokens, t, eps = self.noised(*batch, draws, device)
        return mean_squared_error(net(self.schedule.add_noise(x0, eps, t), t, tokens), eps)


class EstimatorRun(ShapesRun):
    """Step 2: a control estimator on (image, exact control) pairs; width = hidden_size, blocks per level = depth."""
    fields = pipeline_fields("task", "hidden_size", "depth")

    def build(self):
        output = "logits" if self.task.categorical else "sigmoid"
        return ControlEstimator(self.task.channels, self.config["hidden_size"], self.config["depth"], output)

    def loss(self, net, batch, draws, device):
        images, _, control = (tensor.to(device, non_blocking=True) for tensor in batch)
        return control_loss(net(images), control, self.task.settings.probe_kind)


def required_run(config, field, role):
    if not config.get(field):
        raise ValueError(f"the {config['job']} job needs --{field.replace('_', '-')} RUN/latest.pt ({role})")
    return config[field]


class ProbeRun(ShapesRun):
    """Step 3: the readout probe on the frozen base UNet's decoder features (tap mode `tap_mode`) of noised real
    images at random t, regressing the control (the alignment loss of Eq. 7 with the probe trainable); its width P is
    hidden_size. Captions are dropped as in the ControlNet's training, so the probe knows the features of both."""
    fields = pipeline_fields("task", "tap_mode", "base", "hidden_size", "label_dropout")

    def __init__(self, config, load=True):
        super().__init__(config, load)
        self.base, _ = load_trained(required_run(config, "base", "the base UNet run"), "unet", load=load)

    def build(self):
        unet = self.base.unet
        return ReadoutProbe(unet.tap_channels(self.config["tap_mode"]), unet.emb_channels,
                            self.task.channels, self.config["image_size"], self.config["hidden_size"],
                            output="logits" if self.task.categorical else "tanh")

    def loss(self, net, batch, draws, device):
        images, tokens, control = batch
        x0, tokens, t, eps = self.noised(images, tokens, draws, device)
        control = control.to(device, non_blocking=True)
        with torch.no_grad():
            _, features = self.base(self.schedule.add_noise(x0, eps, t), t, tokens, taps=self.config["tap_mode"])
            t_emb = self.base.unet.embed_time(t)
        return alignment_loss(net, features, t_emb, control, self.task.settings.probe_kind)


class ControlNetRun(ShapesRun):
    """Steps 4-5: a ControlNet (initialised from the base UNet's encoder, or from the run `init`) on the frozen base,
    trained with Eq. 8: the diffusion loss, + alpha x the reward of `reward_model` on the one-step estimate over
    reward_range, + beta x the alignment of the frozen `probe` over align_range. alpha, beta and the ranges default to
    the task's Table 4 column; alpha 0 / beta 0 leave the term (and its network) out."""
    fields = pipeline_fields("task", "base", "probe", "reward_model", "init", "alpha", "beta", "reward_range",
                             "align_range", "eq8_reduction", "label_dropout")
    added_fields = dict(OLD_SCENES, **OLD_EQ8_FIELDS)

    def __init__(self, config, load=True):
        super().__init__(config, load)
        self.load = load
        settings = self.task.settings
        alpha, beta, reward_range, align_range = eq8_weights(settings, config, self.schedule.num_timesteps)
        self.base, _ = load_trained(required_run(config, "base", "the base UNet run"), "unet", load=load)
        reward_model = probe = tap_mode = None
        if alpha:
            path = required_run(config, "reward_model", f"an estimator run of task {self.task_name}, for alpha > 0")
            reward_model, _ = self.partner(path, "estimator", load)
        if beta:
            path = required_run(config, "probe", f"a probe run of task {self.task_name}, for beta > 0")
            probe, probe_config = self.partner(path, "probe", load)
            tap_mode = probe_config["tap_mode"]
            check_probe_fits(probe, self.base.unet, tap_mode, path)
        self.terms = InnerControlTerms(alpha, reward_model, reward_range, settings.reward_kind, beta, probe, tap_mode,
                                       align_range, settings.alignment_kind, eq8_reduction=config["eq8_reduction"])

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

    def loss(self, net, batch, draws, device):
        images, tokens, control = batch
        tokens = drop_captions(tokens, self.config["label_dropout"], draws)
        return innercontrol_training_step(net, self.base, self.schedule, self.terms, images, tokens,
                                          hint_of(control, self.task_name), control, draws, device)


def check_probe_fits(probe, unet, tap_mode, path):
    """A probe trained on another UNet's features cannot read this one's: name what it expects and what it gets."""
    channels, t_emb_dim = unet.tap_channels(tap_mode), unet.emb_channels
    if probe.feature_channels != channels or probe.t_emb_dim != t_emb_dim:
        raise ValueError(f"probe {path} was trained on {len(probe.feature_channels)} '{tap_mode}' feature maps with "
                         f"channels {probe.feature_channels} and a timestep embedding of width "
                         f"{probe.t_emb_dim}; this base UNet gives {len(channels)} maps with channels "
                         f"{channels} and width {t_emb_dim}")


RUNS = {"dit": ShapesDiTRun, "unet": UNetRun, "estimator": EstimatorRun, "probe": ProbeRun,
        "controlnet": ControlNetRun}


def run_class(preset):
    """The kind of run a named config is, for its fields: DiTRun for a DiT on images or latents (no shapes fields),
    else its job's."""
    return DiTRun if preset["job"] == "dit" and preset["data"] != "shapes" else RUNS[preset["job"]]


def make_run(config, load=True):
    """The run of a config, by its `job` (what ref.trainer.fit is given)."""
    if config["job"] not in RUNS:
        raise ValueError(f"unknown job {config['job']!r}; choose one of {', '.join(RUNS)}")
    return RUNS[config["job"]](config, load)


# ---------------------------------------------------------------------------------------------------------------------
# Named configs of the testbed (train.py --config NAME; the ImageNet ones are in ref/configs.py)
# ---------------------------------------------------------------------------------------------------------------------

_SHAPES = dict(DIT_DEFAULTS, data="shapes", shapes_items=1_000_000, shapes_max_objects=MAX_OBJECTS, image_size=32,
               num_classes=len(SHAPE_CLASSES))
SHAPES_CONFIGS = {
    # A few minutes on 2 CPU cores: a 4-block, 96-wide DiT on 4x4 patches of 32 px shapes, the IG head after block 1.
    # A higher lr and a shorter EMA than SiT's, for a run of a few hundred steps.
    "shapes-tiny": dict(_SHAPES, depth=4, hidden_size=96, num_heads=4, patch_size=4, intermediate_block=1,
                        batch_size=32, steps=300, lr=1e-3, ema_decay=0.98, checkpoint_every=100, log_every=25),
    # The IG-at-image-scale CPU run (README), about 30 minutes on 2 cores (2 ranks of 1 thread): 6 blocks of width
    # 192 (3 heads) on 4x4 patches, the IG head after block 2 of 6 (a third of the depth, as block 4 of 12 in
    # SiT-B/2); 224,000 images. Half DiT-S's width buys 5x the images of a DiT-S-wide run in the same time (at 650
    # steps that one drew no shapes yet); lr 1e-3, EMA 0.999 (a 1000-step window).
    "shapes-small": dict(_SHAPES, depth=6, hidden_size=192, num_heads=3, patch_size=4, intermediate_block=2,
                         batch_size=64, steps=3500, lr=1e-3, ema_decay=0.999, checkpoint_every=250, log_every=50),
    # The testbed of issue 15 (README): 16 px scenes of one object on the ground plane (the label is its class,
    # nothing occludes it), a DiT on 2x2 patches (64 tokens). The 32 px scenes on 4x4 patches (the same 64 tokens)
    # learned the classes far slower: unguided label accuracy 0.26 after 480,000 images, against 0.31 here after
    # 176,000. The recipe of issue 24, chosen on selection seeds (unguided label accuracy, docs/testbed.md): pilots of
    # 176,000 images chose logit-normal t, the lr lowered linearly to 0 over the last 30% of the steps, batch 64 at
    # lr 4e-3 (1.27x the images a second of batch 32 on 2 ranks), Adam's beta2 0.95 and a 500-step EMA; 30-minute
    # runs at equal cost chose 8 blocks of width 64 (4 heads, the IG head after block 2: a quarter of the depth, as
    # before) over 4 of width 96 (0.814 against 0.782) and over batch 32, and then IG's accelerated training at omega
    # 0.5 (0.852 against 0.814; the EMA's extra forward pass costs 0.75x the images a second, so 6,600 steps = 422,400
    # images, about 30 min on 2 cores, 2 ranks of 1 thread). Issue 15's run: 4 x 96, t ~ U(0, 1), batch 32 at a
    # constant lr 2e-3, beta2 0.999, EMA 0.999, 22,000 steps.
    "shapes-one-object": dict(_SHAPES, shapes_max_objects=1, image_size=16, depth=8, hidden_size=64, num_heads=4,
                              patch_size=2, intermediate_block=2, batch_size=64, steps=6600, lr=4e-3,
                              lr_decay_steps=1980, t_distribution="logit-normal", adam_beta2=0.95,
                              ema_decay=0.998, ig_omega=0.5, checkpoint_every=500, log_every=100),
}
# The InnerControl pipeline (README): the testbed of issue 15, 16 px scenes of one object on the ground plane (exact
# depth, segmentation and edges), in pixel space with SD1.5's scaled-linear DDPM betas (1000 steps; Table 4's
# timestep ranges are in its steps; its terminal sqrt(abar) of 0.07, against 0.006 for the linear betas, keeps the
# one-step x0 of an eps model usable at high t: with linear betas a 1000-step base sampled saturated colours),
# captions dropped with probability label_dropout for CFG. Each stage reads the runs before it from their default
# folders; "{task}" in a path is the run's task. Every stage of every task: `train.py --config NAME --task TASK`.
# (The first documented run used 32 px scenes of up to 3 objects: --image-size 32 --shapes-max-objects 3.)
_PIPELINE = dict(RUN_DEFAULTS, image_size=16, shapes_items=1_000_000, shapes_max_objects=1,
                 beta_schedule="scaled_linear", label_dropout=0.1, unet="tiny", task="depth", tap_mode="conv",
                 base="runs/shapes-unet/latest.pt", probe="runs/shapes-probe-{task}/latest.pt",
                 reward_model="runs/shapes-estimator-reward-{task}/latest.pt", init=None, alpha=None, beta=None,
                 reward_range=None, align_range=None, eq8_reduction="unbiased", checkpoint_every=250,
                 log_every=50)
SHAPES_CONFIGS.update({
    # The sizes are the documented CPU run of shapes/experiment.py (README; these sizes with rows of 2,000 steps:
    # depth RMSE 15.18, 1.76x the floor, after ~43 min of training); EMA windows of a quarter to a half of each run.
    # The whole depth pipeline in 30 minutes on 2 cores (issue 24) is shapes/experiment.py's BUDGETS["30min"] on
    # these presets: 1.73x the floor over four held-out training seeds (docs/testbed.md).
    # 1. the base text-to-image UNet (the tiny preset: 1.0M parameters), 256,000 images
    "shapes-unet": dict(_PIPELINE, job="unet", batch_size=64, steps=4000, lr=1e-3, ema_decay=0.999,
                        t_distribution="uniform", t_location=0.0),
    # 2. control estimators: the reward model D (weaker: narrow, short) and the evaluation model (wider, longer)
    "shapes-estimator-reward": dict(_PIPELINE, job="estimator", hidden_size=16, depth=1, batch_size=32, steps=300,
                                    lr=1e-3, ema_decay=0.99),
    "shapes-estimator-eval": dict(_PIPELINE, job="estimator", hidden_size=32, depth=2, batch_size=32, steps=2000,
                                  lr=1e-3, ema_decay=0.995),
    # 3. the readout probe on the frozen base (Adam lr 1e-3 and batch 16 as Readout Guidance; P = 64 for the tiny UNet)
    "shapes-probe": dict(_PIPELINE, job="probe", hidden_size=64, batch_size=16, steps=1000, lr=1e-3, ema_decay=0.99),
    # 4. the ControlNet fine-tuned with the diffusion loss alone (lr 3e-4: 1e-4 of the paper is for batch 256 and
    #    thousands of steps), 64,000 images
    "shapes-controlnet": dict(_PIPELINE, job="controlnet", alpha=0.0, beta=0.0, batch_size=32, steps=2000, lr=3e-4,
                              ema_decay=0.995),
    # 5. continued from step 4 with Eq. 8 (alpha, beta, ranges: Table 4 unless given)
    "shapes-innercontrol": dict(_PIPELINE, job="controlnet", init="runs/shapes-controlnet-{task}/latest.pt",
                                batch_size=32, steps=400, lr=3e-4, ema_decay=0.99),
})
