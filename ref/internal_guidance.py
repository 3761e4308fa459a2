"""Internal Guidance ("Guiding a Diffusion Transformer with the Internal Dynamics of Itself", Zhou et al., arXiv
2512.24176): the training of a DiT / SiT (ref/dit.py) or a LightningDiT (ref/lightningdit.py) with an auxiliary head
after an intermediate block.

Training step (`ig_training_step`): both heads regress the same target,
    L = ||D_f - target||^2 + lambda ||D_i - target||^2                      (the IG objective, lambda = 0.5)
with the flow velocity target eps - x0 on x_t = (1 - t) x0 + t eps, t ~ U(0, 1) (SiT / the IG release), or the DDPM
noise eps on x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ~ U{0..T-1} (DiT). Options of the flow objective:
LightningDiT's cosine term 1 - cos(D_f, v) (ref.losses.cosine_distance) and IG's accelerated training, the final
head's target shifted by omega sg(D_f^EMA - D_i^EMA) (ref/ig_acceleration.py). Sampling with IG,
D_i + w (D_f - D_i), is ref.guidance.guided_denoiser.
"""
import functools

import torch

from ref.configs import TRAINING_FIELDS, optional_int
from ref.data import ImageFolder
from ref.dit import DiT
from ref.ig_acceleration import accelerated_flow_matching_loss
from ref.latents import TrainingLatents, vae_geometry
from ref.lightningdit import LightningDiT
from ref.losses import (check_t_draw, ddpm_eps_loss, ddpm_timesteps, drop_labels, flow_matching_loss,
                        flow_timesteps)
from ref.schedules import DDPMSchedule

LATENT_CHANNELS, LATENT_DOWNSAMPLING = vae_geometry("sd")[:2]  # the SD VAE's (4, 8), of the release checkpoints
ARCHITECTURES = {"dit": DiT, "lightningdit": LightningDiT}  # one constructor interface: ref.dit.DiT's


def ig_training_step(model, x0, y, draws, device, label_dropout, num_classes, aux_weight, schedule=None,
                     cosine_loss=False, ema_model=None, omega=0.0, t_distribution="uniform", t_location=0.0):
    """Per-sample IG loss of one batch. -> (N,)

    model(x_t, t, y) -> (D_f, D_i); x0 (N, C, H, W) images or latents, y (N,) labels; draws: each sample's generator
    (ref.runtime.SampleDraws), drawn in the order label dropout, t, noise. schedule: None for flow matching, the
    DDPMSchedule for the eps objective. t from t_distribution at t_location (ref.losses.flow_timesteps; for eps its
    binning onto the DDPM steps, ddpm_timesteps); cosine_loss adds 1 - cos(D_f, target); omega != 0 is the accelerated
    training with the EMA network ema_model."""
    y = torch.cat([drop_labels(label[None], label_dropout, num_classes, generator)  # CFG: null label = num_classes
                   for label, generator in zip(y, draws.generators)])  # (N,)
    t = (flow_timesteps(draws, t_distribution, t_location) if schedule is None
         else ddpm_timesteps(draws, schedule.num_timesteps, t_distribution, t_location))  # (N,)
    eps = draws.randn(*x0.shape[1:])  # (N, C, H, W)
    x0, y, t, eps = (tensor.to(device, non_blocking=True) for tensor in (x0, y, t, eps))
    if schedule is not None:  # ||D_f - eps||^2 + lambda ||D_i - eps||^2
        return ddpm_eps_loss(model, schedule, x0, t, y, eps, aux_weight)
    if omega:  # ||D_f - (v + omega sg(D_f^EMA - D_i^EMA))||^2 + lambda ||D_i - v||^2
        return accelerated_flow_matching_loss(model, ema_model, x0, t, y, eps, omega, aux_weight, cosine_loss)
    return flow_matching_loss(model, x0, t, y, eps, aux_weight, cosine_loss)  # ||D_f - v||^2 + lambda ||D_i - v||^2


def network_input_shape(config):
    """(C, H, W) of what the network sees: RGB pixels in [-1, 1], or latents of the config's VAE (z channels at
    1 / f of the image side)."""
    if config["data"] == "latents":
        channels, factor, _ = vae_geometry(config["vae"])
        if config["image_size"] % factor:
            raise ValueError(f"--image-size {config['image_size']} is not a multiple of the {config['vae']} VAE's "
                             f"downsampling factor {factor}")
        return channels, config["image_size"] // factor, config["image_size"] // factor
    return 3, config["image_size"], config["image_size"]


def dit_from_config(config):
    """The DiT / SiT or LightningDiT (`arch`) of a train.py config (learned sigma off: both objectives regress one
    prediction; LightningDiT with the release's qk-norm and wo_shift, both off)."""
    if config["arch"] not in ARCHITECTURES:
        raise ValueError(f"unknown arch {config['arch']!r}; choose one of {', '.join(ARCHITECTURES)}")
    channels, side, _ = network_input_shape(config)
    return ARCHITECTURES[config["arch"]](
        input_size=side, patch_size=config["patch_size"], in_channels=channels, hidden_size=config["hidden_size"],
        depth=config["depth"], num_heads=config["num_heads"], num_classes=config["num_classes"],
        class_dropout_prob=config["label_dropout"], intermediate_block=config["intermediate_block"],
        gradient_checkpointing=config["gradient_checkpointing"])


def collate_inputs_labels(samples):
    """Every dataset puts (input, label) first -> x (N, C, H, W), y (N,) long."""
    return torch.stack([sample[0] for sample in samples]), torch.tensor([sample[1] for sample in samples])


class DiTRun:
    """The IG run for ref.trainer.fit: a DiT / SiT or LightningDiT with the IG head on an image folder or latent
    shards."""
    fields = dict(
        TRAINING_FIELDS,
        data=(str, "images (folder <class>/<image>) | latents (VAE shards of prepare.py latents)"),
        data_path=(str, "the image folder or the folder of latents_*.npy / labels_*.npy shards"),
        vae=(str, "latents: the ref/vae.py preset that encoded them (sd | vavae-f16d32 | tiny)"),
        image_size=(int, "image side in pixels (latents: the image they encode; the network sees image_size / f, "
                         "f the VAE's downsampling)"),
        num_classes=(int, "class labels 0..num_classes-1; label num_classes is the null label of CFG"),
        flip=(bool, "images: add mirrored copies (the dataset doubles)"),
        arch=(str, "dit (DiT / SiT) | lightningdit (LightningDiT: SwiGLU, RoPE, RMSNorm)"),
        depth=(int, "transformer blocks"),
        hidden_size=(int, "token width"),
        num_heads=(int, "attention heads"),
        patch_size=(int, "patch side in network-input pixels"),
        intermediate_block=(optional_int, "IG head after this block (1-indexed); none for a plain DiT / SiT"),
        objective=(str, "flow (SiT / IG: velocity eps - x0, t ~ U(0, 1)) | eps (DiT: DDPM noise, t ~ U{0..T-1})"),
        beta_schedule=(str, "eps objective: DDPM betas (linear, scaled_linear, cosine), 1000 steps"),
        aux_weight=(float, "lambda of the IG auxiliary loss ||D_i - target||^2"),
        t_distribution=(str, "t of the training draws, uniform (SiT / IG: U(0, 1); eps: U{0..T-1}) | logit-normal "
                             "(SD3: sigmoid of N(m, 1), more weight on the middle of the path; eps: binned onto the "
                             "T steps)"),
        t_location=(float, "logit-normal t: the m of N(m, 1) (SD3: 0; > 0 trains nearer the noise)"),
        cosine_loss=(bool, "flow: add LightningDiT's 1 - cos(D_f, v) (over channels, a mean over positions)"),
        ig_omega=(float, "flow: IG's accelerated training, the final head regresses v + omega sg(D_f^EMA - D_i^EMA) "
                         "(0: off; it settles at IG of weight 1 / (1 - omega), none for omega >= 1)"),
        label_dropout=(float, "probability of replacing a label by the null label (CFG training)"),
        gradient_checkpointing=(bool, "recompute block activations in the backward pass to save memory"),
    )

    def __init__(self, config, load=True):
        self.config = config
        if config["objective"] not in ("flow", "eps"):
            raise ValueError(f"unknown objective {config['objective']!r}; choose flow or eps")
        self.schedule = DDPMSchedule.named(config["beta_schedule"]) if config["objective"] == "eps" else None
        check_t_draw(config)
        for name, on in (("--ig-omega", config["ig_omega"]), ("--cosine-loss", config["cosine_loss"])):
            if on and config["objective"] != "flow":
                raise ValueError(f"{name} is an option of the flow objective, not of {config['objective']!r}")
        if config["ig_omega"] and config["intermediate_block"] is None:
            raise ValueError("--ig-omega (IG's accelerated training) needs the IG head: set --intermediate-block")
        self.ema = None  # the trainer's EMA network (use_ema): the accelerated training evaluates it

    def use_ema(self, ema):
        self.ema = ema

    @functools.cached_property
    def latents(self):
        """The shards of data_path as training reads them (read on first use: a run built only to sample needs no
        data)."""
        return TrainingLatents(self.config["data_path"], self.config["vae"], network_input_shape(self.config))

    def dataset_and_classes(self):
        """The training data and its class count; bad input (missing, empty or malformed folders and shards) raises
        ValueError naming the file or setting."""
        config = self.config
        if config["data"] not in ("images", "latents"):
            raise ValueError(f"unknown data {config['data']!r}; choose images or latents")
        if not config["data_path"]:
            raise ValueError(f"--data {config['data']} needs --data-path")
        if config["data"] == "images":
            dataset = ImageFolder(config["data_path"], config["image_size"], flip=config["flip"])
            return dataset, len(dataset.classes)
        dataset = self.latents.dataset
        return dataset, int(dataset.labels.max()) + 1

    def make_dataset(self):
        dataset, classes = self.dataset_and_classes()
        if classes > self.config["num_classes"]:
            raise ValueError(f"the data has {classes} classes but the config {self.config['num_classes']}; "
                             f"set --num-classes")
        return dataset

    def build(self):
        return dit_from_config(self.config)

    collate = staticmethod(collate_inputs_labels)

    def to(self, device):
        return self

    def loss(self, net, batch, draws, device):
        config, (x0, y) = self.config, batch
        if config["data"] == "latents":  # the moments' posterior sample: each sample's first draw
            x0 = self.latents.network_input(x0, draws)
        return ig_training_step(net, x0, y, draws, device, config["label_dropout"], config["num_classes"],
                                config["aux_weight"], self.schedule, config["cosine_loss"], self.ema,
                                config["ig_omega"], config["t_distribution"], config["t_location"])
