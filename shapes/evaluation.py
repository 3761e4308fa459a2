"""Generation with the ControlNet-steered base UNet for the InnerControl evaluation on the shapes data (the protocol
of ../shared/notes/innercontrol.md, scaled down); the control-error measurements live in ref/control_evaluation.py.

Generation: DDIM over evenly spaced steps, classifier-free guidance on the caption (the empty caption is the null
condition) with the control given to both branches, as ControlNet samples by default. Evaluation: the evaluation
estimator (a stronger network than the reward model, trained apart) reads the control back from each generated image;
depth is scored by RMSE on the 0-255 scale, segmentation by mIoU over the whole set, edges by SSIM (data range 1; at
32 px an image is too small for MS-SSIM's five scales). Fig. 2's measurement, ref.control_evaluation.errors_across_t,
compares the probe's reading of the decoder features with the reward model's reading of the one-step estimate.
"""
import torch

from ref.guidance import controlled_denoiser
from ref.samplers import ddim, spaced_timesteps
from shapes.data import Shapes
from shapes.text import PAD

EVAL_SCENE_SEED = 2000  # Shapes seed of the evaluation scenes (controls and captions), away from training's 0


def evaluation_scenes(config, count):
    """The first `count` held-out evaluation scenes of a pipeline run's config: its size and objects a scene."""
    return Shapes(config["image_size"], num_items=count, seed=EVAL_SCENE_SEED, max_objects=config["shapes_max_objects"])


@torch.no_grad()
def generate(base, controlnet, schedule, hint, tokens, noise, steps, cfg_scale, eta=0.0, randn_like=torch.randn_like):
    """Images (B, 3, H, W) in [-1, 1] (float32) from noise (B, 3, H, W) by `steps` DDIM steps (eta 0: deterministic;
    1: DDPM-like, fresh noise from randn_like at every step), every x0 estimate clipped to the pixel range [-1, 1]."""
    context = base.text_encoder(tokens)  # (B, L, D_ctx), once for every step
    null_context = base.text_encoder(torch.full_like(tokens[:1], PAD))  # (1, L, D_ctx): the empty caption
    denoise = controlled_denoiser(base.unet, controlnet, context, null_context, hint, cfg_scale)
    return ddim(denoise, noise, schedule, spaced_timesteps(schedule, steps), eta=eta, randn_like=randn_like,
                clip_x0=(-1.0, 1.0)).float()
