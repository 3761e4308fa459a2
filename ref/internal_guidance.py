"""Internal Guidance ("Guiding a Diffusion Transformer with the Internal Dynamics of Itself", Zhou et al., arXiv
2512.24176): the training of a DiT / SiT with an auxiliary head after an intermediate block (ref/dit.py).

Training step (`ig_training_step`): both heads regress the same target,
    L = ||D_f - target||^2 + lambda ||D_i - target||^2                      (the IG objective, lambda = 0.5)
with the flow velocity target eps - x0 on x_t = (1 - t) x0 + t eps, t ~ U(0, 1) (SiT / the IG release), or the DDPM
noise eps on x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ~ U{0..T-1} (DiT). Sampling with IG,
D_i + w (D_f - D_i), is ref.guidance.guided_denoiser.
"""
import torch

from ref.configs import TRAINING_FIELDS, optional_int
from ref.data import ImageFolder, LatentShards
from ref.dit import DiT
from ref.losses import ddpm_eps_loss, drop_labels, flow_matching_loss
from ref.schedules import DDPMSchedule

LATENT_CHANNELS, LATENT_DOWNSAMPLING = 4, 8  # SD-VAE: 256 px image -> (4, 32, 32) latent


def ig_training_step(model, x0, y, draws, device, label_dropout, num_classes, aux_weight, schedule=None):
    """Per-sample IG loss of one batch. -> (N,)

    model(x_t, t, y) -> (D_f, D_i); x0 (N, C, H, W) images or latents, y (N,) labels; draws: each sample's generator
    (ref.runtime.SampleDraws), drawn in the order label dropout, t, noise. schedule: None for flow matching, the
    DDPMSchedule for the eps objective."""
    y = torch.cat([drop_labels(label[None], label_dropout, num_classes, generator)  # CFG: null label = num_classes
                   for label, generator in zip(y, draws.generators)])  # (N,)
    t = draws.rand() if schedule is None else draws.randint(schedule.num_timesteps)  # U(0, 1) / U{0..T-1}, (N,)
    eps = draws.randn(*x0.shape[1:])  # (N, C, H, W)
    x0, y, t, eps = (tensor.to(device, non_blocking=True) for tensor in (x0, y, t, eps))
    if schedule is None:  # ||D_f - v||^2 + lambda ||D_i - v||^2, v = eps - x0
        return flow_matching_loss(model, x0, t, y, eps, aux_weight)
    return ddpm_eps_loss(model, schedule, x0, t, y, eps, aux_weight)  # ||D_f - eps||^2 + lambda ||D_i - eps||^2


def network_input_shape(config):
    """(C, H, W) of what the DiT sees: RGB pixels in [-1, 1], or scaled SD-VAE latents at 1/8 of the image side."""
    if config["data"] == "latents":
        side = config["image_size"] // LATENT_DOWNSAMPLING
        return LATENT_CHANNELS, side, side
    return 3, config["image_size"], config["image_size"]


def dit_from_config(config):
    """The DiT / SiT of a train.py config (learned sigma off: both objectives regress one prediction)."""
    channels, side, _ = network_input_shape(config)
    return DiT(input_size=side, patch_size=config["patch_size"], in_channels=channels,
               hidden_size=config["hidden_size"], depth=config["depth"], num_heads=config["num_heads"],
               num_classes=config["num_classes"], class_dropout_prob=config["label_dropout"],
               intermediate_block=config["intermediate_block"],
               gradient_checkpointing=config["gradient_checkpointing"])


def collate_inputs_labels(samples):
    """Every dataset puts (input, label) first -> x (N, C, H, W), y (N,) long."""
    return torch.stack([sample[0] for sample in samples]), torch.tensor([sample[1] for sample in samples])


class DiTRun:
    """The IG run for ref.trainer.fit: a DiT / SiT with the IG head on an image folder or latent shards."""
    fields = dict(
        TRAINING_FIELDS,
        data=(str, "images (folder <class>/<image>) | latents (SD-VAE shards)"),
        data_path=(str, "the image folder or the folder of latents_*.npy / labels_*.npy shards"),
        image_size=(int, "image side in pixels (latents: the image they encode; the network sees image_size / 8)"),
        num_classes=(int, "class labels 0..num_classes-1; label num_classes is the null label of CFG"),
        flip=(bool, "images: add mirrored copies (the dataset doubles)"),
        depth=(int, "transformer blocks"),
        hidden_size=(int, "token width"),
        num_heads=(int, "attention heads"),
        patch_size=(int, "patch side in network-input pixels"),
        intermediate_block=(optional_int, "IG head after this block (1-indexed); none for a plain DiT / SiT"),
        objective=(str, "flow (SiT / IG: velocity eps - x0, t ~ U(0, 1)) | eps (DiT: DDPM noise, t ~ U{0..T-1})"),
        beta_schedule=(str, "eps objective: DDPM betas (linear, scaled_linear, cosine), 1000 steps"),
        aux_weight=(float, "lambda of the IG auxiliary loss ||D_i - target||^2"),
        label_dropout=(float, "probability of replacing a label by the null label (CFG training)"),
        gradient_checkpointing=(bool, "recompute block activations in the backward pass to save memory"),
    )

    def __init__(self, config, load=True):
        self.config = config
        if config["objective"] not in ("flow", "eps"):
            raise ValueError(f"unknown objective {config['objective']!r}; choose flow or eps")
        self.schedule = DDPMSchedule.named(config["beta_schedule"]) if config["objective"] == "eps" else None

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
        dataset = LatentShards(config["data_path"], network_input_shape(config))
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
        config = self.config
        return ig_training_step(net, *batch, draws, device, config["label_dropout"], config["num_classes"],
                                config["aux_weight"], self.schedule)
