"""The control-error measurements of the InnerControl evaluation (../shared/notes/innercontrol.md, "Evaluation
protocol"), shared by the shapes testbed (shapes/) and the SD1.5 runs (ref/sd_evaluation.py):

    ControlScore      a task's control metric over batches of (estimate, control): depth RMSE on the 0-255 scale,
                      HED / LineArt MS-SSIM with SSIM beside, the shapes edges' SSIM (and MS-SSIM on maps large
                      enough for its five scales), segmentation mIoU over the set
    errors_across_t   Fig. 2: at each t, the probe's reading of the decoder features against the reward model's reading
                      of the one-step estimate x0 (Eq. 5), both scored by ControlScore
    line_chart        Fig. 2's chart, drawn with Pillow
"""
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ref.control_losses import IGNORE_LABEL
from ref.metrics import MS_SSIM_WEIGHTS, SegmentationIoU, depth_rmse, ms_ssim, ssim
from ref.probes import tanh_reading

# The headline metric of each task: lower is better for rmse, higher for the others. HED and LineArt: MS-SSIM, what
# the released evaluation computes (InnerControl `eval/eval_edge.py`:47, ControlNet++'s :79: torchmetrics'
# MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)); the paper's tables call it SSIM. "edges": the shapes
# testbed's edge task, SSIM (its 16 px maps are far below MS-SSIM's smallest side).
CONTROL_METRICS = {"depth": "rmse", "segmentation": "miou", "edges": "ssim", "hed": "ms_ssim", "lineart": "ms_ssim"}
SSIM_WINDOW = 11
MS_SSIM_SIDE = SSIM_WINDOW * 2 ** (len(MS_SSIM_WEIGHTS) - 1)  # 176: the smallest side MS-SSIM's coarsest scale fits
# Fig. 2's curves read edges by SSIM, defined at any size (they are drawn on small networks too); the rest as above.
CURVE_METRICS = {**CONTROL_METRICS, "hed": "ssim", "lineart": "ssim"}


def check_map_side(task, side):
    """An evaluation whose headline is MS-SSIM needs maps of at least MS_SSIM_SIDE pixels a side, as torchmetrics
    refuses smaller ones: raise a ValueError before any compute."""
    if CONTROL_METRICS[task] == "ms_ssim" and side < MS_SSIM_SIDE:
        raise ValueError(f"{task} maps of ({side}, {side}) pixels: MS-SSIM, the released metric (5 scales, window "
                         f"{SSIM_WINDOW}), needs at least {MS_SSIM_SIDE} pixels a side; evaluate at the paper's 512 px")


class ControlScore:
    """The task's control metric accumulated over batches of (estimate, control):
    depth: mean per-image RMSE (0-255); edges: mean per-image SSIM and MS-SSIM (ref.metrics.ms_ssim, torchmetrics'
    defaults: window 11, sigma 1.5, the five weights of Wang et al. 2003, negative terms clamped to 0), MS-SSIM for
    maps of at least MS_SSIM_SIDE pixels a side (check_map_side refuses evaluations below it); segmentation: mIoU
    over the whole set, IGNORE_LABEL left out.
    estimate: maps (B, 1, H, W) in [0, 1], or logits (B, K, H, W) for segmentation; control: the exact control, maps
    (B, 1, H, W) in [0, 1] or labels (B, H, W)."""

    def __init__(self, task, num_classes=None):
        if task not in CONTROL_METRICS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(CONTROL_METRICS)}")
        self.task, self.per_image = task, {}
        self.iou = SegmentationIoU(num_classes, IGNORE_LABEL) if task == "segmentation" else None

    def update(self, estimate, control):
        estimate, control = estimate.detach().cpu().double(), control.detach().cpu()
        if self.task == "segmentation":
            self.iou.update(estimate.argmax(1), control)
        elif self.task == "depth":
            self.per_image.setdefault("rmse", []).append(depth_rmse(255 * estimate[:, 0], 255 * control[:, 0].double()))
        else:
            side = min(control.shape[-2:])
            self.per_image.setdefault("ssim", []).append(ssim(estimate, control.double(), data_range=1.0))
            if side >= MS_SSIM_SIDE:
                self.per_image.setdefault("ms_ssim", []).append(ms_ssim(estimate, control.double(), data_range=1.0))

    def result(self):
        """{metric name: value}."""
        if self.task == "segmentation":
            return {"miou": self.iou.miou}
        return {name: float(torch.cat(values).mean()) for name, values in self.per_image.items()}


def probe_reading(probe, features, t_emb, control_channels):
    """The probe's control estimate in the estimators' form: maps in [0, 1] (a tanh probe's, ref.probes.tanh_reading),
    or logits."""
    estimate = probe(features, t_emb)
    return estimate if probe.output == "logits" else tanh_reading(estimate, control_channels)


def at_size(estimate, size):
    """A reading (B, C, h, w) resized bilinearly to the control's (H, W) when it has another size (a probe reads at
    its resolution R, the release resizes to the training resolution)."""
    if tuple(estimate.shape[-2:]) == tuple(size):
        return estimate
    return F.interpolate(estimate, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def errors_across_t(base, controlnet, probe, tap_mode, read_x0, schedule, task, batch, timesteps, seed=0):
    """Fig. 2's measurement: at each t, noise the clean inputs x0 (one noise draw, seeded, shared by every t), run the
    UNet once (steered by the ControlNet; controlnet None: the UNet alone), and score (ControlScore) the probe's
    reading of its decoder features and read_x0 of the one-step estimate x0 = (x_t - sqrt(1 - abar_t) eps_hat) /
    sqrt(abar_t) (Eq. 5): the reward model on it (after the VAE decoder for a latent model).
    base: .text_encoder(tokens) and .unet(x, t, context, control, taps); batch: x0 (B, C, h, w), tokens (B, L),
    control, hint. -> one row per t: {"t", "probe": {metric: value}, "reward": {...}, "x0": (C, h, w) one-step
    estimate of sample 0, "reward_estimate", "probe_estimate": its readings}"""
    clean, tokens, control, hint = batch
    eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)).to(clean)
    context = base.text_encoder(tokens)
    rows = []
    for step in timesteps:
        t = torch.full((len(clean),), int(step), dtype=torch.long, device=clean.device)
        x_t = schedule.add_noise(clean, eps, t)
        residuals = None if controlnet is None else controlnet(x_t, hint, t, context)
        eps_hat, features = base.unet(x_t, t, context, control=residuals, taps=tap_mode)
        x0 = schedule.x0_from_eps(x_t, eps_hat, t)
        readings = {"probe": probe_reading(probe, features, base.unet.embed_time(t), control.shape[1]),
                    "reward": read_x0(x0)}
        row = {"t": int(step), "x0": x0[0].cpu()}
        for name, estimate in readings.items():
            estimate = at_size(estimate, control.shape[-2:])
            score = ControlScore(task, estimate.shape[1] if estimate.shape[1] > 1 else None)
            score.update(estimate, control)
            row[name] = score.result()
            row[f"{name}_estimate"] = estimate[0].cpu()
        rows.append(row)
    return rows


def line_chart(series, title, size=(520, 320), margin=48, x_ticks=range(0, 1001, 200)):
    """Pillow line chart of {name: (colour, [(x, value)])}, x from the first to the last of x_ticks (default the
    timestep t in [0, 1000])."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    values = [value for _, points in series.values() for _, value in points]
    low, high = min(values + [0.0]), max(values) * 1.05 or 1.0
    width, height = size[0] - 2 * margin, size[1] - 2 * margin
    x_low, x_high = x_ticks[0], x_ticks[-1]

    def xy(x, value):
        return margin + width * (x - x_low) / (x_high - x_low), margin + height * (1 - (value - low) / (high - low))
    draw.rectangle([margin, margin, margin + width, margin + height], outline="black")
    for x in x_ticks:
        draw.text((xy(x, low)[0] - 8, margin + height + 6), f"{x:g}", fill="black")
    for fraction in (0, 0.5, 1):
        value = low + fraction * (high - low)
        draw.text((4, xy(x_low, value)[1] - 6), f"{value:.3g}", fill="black")
    draw.text((margin, 8), title, fill="black")
    for row, (name, (colour, points)) in enumerate(series.items()):
        draw.line([xy(x, value) for x, value in points], fill=colour, width=2)
        draw.text((margin + width - 200, 8 + 14 * row), name, fill=colour)  # the legend, above the plot
    return image
