"""Generation with the ControlNet-steered base UNet, and the control-error measurements of the InnerControl
evaluation on the shapes data (the protocol of ../shared/notes/innercontrol.md, scaled down).

Generation: DDIM over evenly spaced steps, classifier-free guidance on the caption (the empty caption is the null
condition) with the control given to both branches, as ControlNet samples by default. Evaluation: the evaluation
estimator (a stronger network than the reward model, trained apart) reads the control back from each generated image;
depth is scored by RMSE on the 0-255 scale, segmentation by mIoU over the whole set, edges by SSIM (data range 1; at
32 px an image is too small for MS-SSIM's five scales). Fig. 2's measurement, `error_across_t`, compares the probe's
reading of the decoder features with the reward model's reading of the one-step estimate at each noise level.
"""
import torch

from ref.guidance import cfg
from ref.innercontrol import IGNORE_LABEL
from ref.metrics import SegmentationIoU, depth_rmse, ssim
from ref.samplers import ddim, spaced_timesteps
from shapes.text import PAD

EVAL_SCENE_SEED = 2000  # Shapes seed of the evaluation scenes (controls and captions), away from training's 0
CONTROL_METRICS = {"depth": "rmse", "segmentation": "miou", "edges": "ssim"}  # lower / higher / higher is better


def controlled_denoiser(base, controlnet, hint, tokens, cfg_scale):
    """denoise(x, t) -> eps for the sampler: the base UNet with the ControlNet's residuals for `hint` (B, C, H, W),
    the caption `tokens` (B, L) guided against the empty caption with weight `cfg_scale` (1: no guidance, one pass)."""
    def eps(x, t, tokens, hint):
        context = base.text_encoder(tokens)  # (B, L, D_ctx)
        return base.unet(x, t, context, control=controlnet(x, hint, t, context))

    def denoise(x, t):
        if cfg_scale == 1.0:
            return eps(x, t, tokens, hint)
        both = [torch.cat(pair) for pair in ((x, x), (t, t), (tokens, torch.full_like(tokens, PAD)), (hint, hint))]
        cond, uncond = eps(*both).chunk(2)
        return cfg(cond, uncond, cfg_scale)
    return denoise


@torch.no_grad()
def generate(base, controlnet, schedule, hint, tokens, noise, steps, cfg_scale):
    """Images (B, 3, H, W) in [-1, 1] (float32) from noise (B, 3, H, W) by `steps` DDIM steps (eta 0), every x0
    estimate clipped to the pixel range [-1, 1]."""
    denoise = controlled_denoiser(base, controlnet, hint, tokens, cfg_scale)
    return ddim(denoise, noise, schedule, spaced_timesteps(schedule, steps), clip_x0=(-1.0, 1.0)).float()


class ControlScore:
    """The task's control metric accumulated over batches of (estimate, exact control):
    depth: mean per-image RMSE (0-255); edges: mean per-image SSIM; segmentation: mIoU over the whole set.
    estimate: maps (B, 1, H, W) in [0, 1], or logits (B, K, H, W) for segmentation; control: the exact control."""

    def __init__(self, task, num_classes=None):
        if task not in CONTROL_METRICS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(CONTROL_METRICS)}")
        self.task, self.per_image = task, []
        self.iou = SegmentationIoU(num_classes, IGNORE_LABEL) if task == "segmentation" else None

    def update(self, estimate, control):
        estimate, control = estimate.detach().cpu().double(), control.detach().cpu()
        if self.task == "segmentation":
            self.iou.update(estimate.argmax(1), control)
        elif self.task == "depth":
            self.per_image.append(depth_rmse(255 * estimate[:, 0], 255 * control[:, 0].double()))
        else:
            self.per_image.append(ssim(estimate, control.double(), data_range=1.0))

    def result(self):
        """{metric name: value}."""
        if self.task == "segmentation":
            return {"miou": self.iou.miou}
        return {CONTROL_METRICS[self.task]: float(torch.cat(self.per_image).mean())}


def probe_reading(probe, features, t_emb):
    """The probe's control estimate in the estimators' form: maps in [0, 1] ((H + 1) / 2 of a tanh probe), or logits."""
    estimate = probe(features, t_emb)
    return estimate if probe.output == "logits" else (estimate + 1) / 2


@torch.no_grad()
def errors_across_t(base, controlnet, probe, tap_mode, reward_model, schedule, task, batch, timesteps, seed=0):
    """Fig. 2's measurement: at each t, noise the real images (one noise draw, seeded, shared by every t), run the
    ControlNet-steered UNet once, and score (ControlScore) the probe's reading of its decoder features and the reward
    model's reading of the one-step estimate x0 = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t) (Eq. 5).
    batch: images (B, 3, H, W), tokens (B, L), control, hint. -> one row per t: {"t", "probe": {metric: value},
    "reward": {...}, "x0": (3, H, W) one-step estimate of sample 0, "reward_estimate", "probe_estimate": its
    readings}"""
    images, tokens, control, hint = batch
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)).to(images)
    context = base.text_encoder(tokens)
    rows = []
    for step in timesteps:
        t = torch.full((len(images),), int(step), dtype=torch.long, device=images.device)
        x_t = schedule.add_noise(images, eps, t)
        eps_hat, features = base.unet(x_t, t, context, control=controlnet(x_t, hint, t, context), taps=tap_mode)
        x0 = schedule.x0_from_eps(x_t, eps_hat, t)
        readings = {"probe": probe_reading(probe, features, base.unet.embed_time(t)), "reward": reward_model(x0)}
        row = {"t": int(step), "x0": x0[0].cpu()}
        for name, estimate in readings.items():
            score = ControlScore(task, estimate.shape[1] if estimate.shape[1] > 1 else None)
            score.update(estimate, control)
            row[name] = score.result()
            row[f"{name}_estimate"] = estimate[0].cpu()
        rows.append(row)
    return rows
