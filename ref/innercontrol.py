"""InnerControl ("Heeding the Inner Voice", arXiv 2507.02321): ControlNet training with two control-consistency terms
added to the diffusion loss (Eq. 8): the ControlNet++ reward on the one-step estimate of x0 (Eq. 5-6) and the
alignment of a readout probe's estimate from the UNet decoder's features (Eq. 7), each switched on per sample by a
timestep range; the per-task settings of Table 4; and the training step (`innercontrol_training_step`). The control
comparisons L(c_spatial, c_hat) both terms use are in ref/control_losses.py, shared with the networks that read a
control back.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ref.configs import optional_float, optional_timestep_range
from ref.control_losses import control_loss, depth_normalised
from ref.losses import mean_squared_error
from ref.probes import tanh_reading


# ---------------------------------------------------------------------------------------------------------------------
# ControlNet++ reward on the one-step estimate (Eq. 5-6)
# ---------------------------------------------------------------------------------------------------------------------

def reward_loss(reward_model, schedule, x_t, eps_hat, t, control, kind, decode=None):
    """L_reward = L(c_spatial, D[G(c_spatial, c_txt, x_t, t)]) per sample -> (B,).

    reward_model: D, a callable image (B, 3, H, W) -> control estimate (frozen, but differentiable: the gradient must
        reach eps_hat).
    schedule: the DDPMSchedule of the diffusion model; x_t (B, C, h, w) the noised real sample ("disturb", not sample
        from scratch), eps_hat its eps prediction, t (B,) integer steps.
    decode: latents -> image (the VAE decoder and whatever input scaling D needs), or None in pixel space.
    Every sample is scored; `innercontrol_loss` keeps the ones whose t lies in the reward range."""
    x0_estimate = schedule.x0_from_eps(x_t, eps_hat, t)  # Eq. 5: (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    image = x0_estimate if decode is None else decode(x0_estimate)
    return control_loss(reward_model(image), control, kind)  # Eq. 6


# ---------------------------------------------------------------------------------------------------------------------
# InnerControl alignment on the decoder features (Eq. 7)
# ---------------------------------------------------------------------------------------------------------------------

def alignment_loss(probe, features, t_emb, control, kind):
    """L_alignment = L(c_spatial, H_t), H_t = H(features_t, t), per sample -> (B,). The target is the input control.

    probe: H (ref.probes.ReadoutProbe), frozen while the ControlNet trains; the gradient reaches the ControlNet
        through the features (B, C_l, H_l, W_l) of the UNet decoder that received its residuals.
    t_emb: the UNet's own timestep embedding of t, (B, D_t).
    control: (B, C, H, W) in [0, 1]: a tanh probe's [-1, 1] is read as (H + 1) / 2, as in the InnerControl release
        (`train/reward_control_aligned.py`:1836); for kind "cross_entropy" the probe gives logits and the control is
        class indices (B, H, W). An estimate of another size than the control is resized to it (bilinear), as the
        release does (:1845, to the 512 px training resolution).
    kind "max_normalised_mse" (depth), as the release (:1840-1845; the paper is silent): the estimate depth_normalised
        at the probe's resolution (its channels averaged, then divided by its maximum), then resized; the control
        depth_normalised; then the MSE, a mean over H, W per sample (the pre-release `train/reward_control.py`:1905 of
        commit 6ab2294; the release as committed lost this mean, :1858).
    Probe training (before the ControlNet's) minimises this loss with the task's probe_kind, the probe trainable and
    the UNet frozen."""
    estimate = probe(features, t_emb)  # H_t
    if kind != "cross_entropy":
        estimate = tanh_reading(estimate, control.shape[1])  # [-1, 1] -> [0, 1]
    if kind == "max_normalised_mse":  # normalised before the resize, as the release; the MSE of the normalised maps
        estimate, control, kind = depth_normalised(estimate), depth_normalised(control), "mse"  # (B, 1, ., .)
    size = control.shape[-2:]
    if estimate.shape[-2:] != size:  # the release resizes H_t to the control's resolution (512 px at SD scale)
        estimate = F.interpolate(estimate, size=size, mode="bilinear", align_corners=False)
    return control_loss(estimate, control, kind)  # Eq. 7


# ---------------------------------------------------------------------------------------------------------------------
# The InnerControl objective (Eq. 8) and the per-task settings of Table 4
# ---------------------------------------------------------------------------------------------------------------------

def in_timestep_range(t, t_range):
    """1[t in [low, high]], both ends included. t (B,) -> (B,) bool"""
    low, high = t_range
    return (t >= low) & (t <= high)


def timestep_masked(per_sample_loss, t, t_range):
    """1[t in range] * loss per sample -> (B,): in-range samples keep their loss, the others give exactly 0 and pass
    no gradient (a select, not a product, so an out-of-range value is dropped, not multiplied)."""
    in_range = in_timestep_range(t, t_range).to(per_sample_loss.device)
    return torch.where(in_range, per_sample_loss, torch.zeros_like(per_sample_loss))


def in_range_only(per_sample_loss, t, t_range):
    """A per-sample loss computed for the samples whose t lies in the range alone, 0 for the others. -> (B,) float32

    per_sample_loss(rows): the loss of the samples `rows` (indices into the batch) -> (len(rows),). The costly terms
    (the VAE decode and the reward model; the probe) so run only where Eq. 8 keeps them."""
    if t.is_meta:  # the FLOP count on the meta device (ref.trainer) cannot read t: every sample counts as in range
        rows = torch.arange(len(t), device=t.device)
    else:
        rows = in_timestep_range(t, t_range).nonzero().squeeze(1)  # (B_in,)
    loss = torch.zeros(len(t), device=t.device)
    if len(rows) == 0:
        return loss
    return loss.index_put((rows,), per_sample_loss(rows).float())


def range_probability(t_range, num_timesteps):
    """P(t in [low, high]) for the training draw t ~ U{0, ..., T - 1}: (high - low + 1) / T, the range clipped to
    the schedule's steps."""
    low, high = max(t_range[0], 0), min(t_range[1], num_timesteps - 1)
    if high < low:
        raise ValueError(f"timestep range {tuple(t_range)} holds none of the steps 0..{num_timesteps - 1}")
    return (high - low + 1) / num_timesteps


EQ8_REDUCTIONS = ("unbiased", "release")


def check_reduction(reduction):
    if reduction not in EQ8_REDUCTIONS:
        raise ValueError(f"--eq8-reduction must be one of {', '.join(EQ8_REDUCTIONS)}, got {reduction!r}")


def in_range_weight(t, t_range, num_timesteps, reduction):
    """The factor w of a masked term in Eq. 8, the batch mean of w 1[t_i in R] L_i standing for its in-range mean:
        "unbiased": w = 1 / P(R), P(R) = (high - low + 1) / T (range_probability);
        "release":  w = B / (N_R + 1e-10) for the B samples of this (micro-)batch, N_R of them in range, so the batch
                    mean is the InnerControl release's  (mask * loss).sum() / (mask.sum() + 1e-10)  per micro-batch
                    (`train/reward_control_aligned.py`:1820 for the reward, :1859 for the alignment; ControlNet++
                    `train/reward_control.py`:1520). -> float or () tensor"""
    check_reduction(reduction)
    if reduction == "unbiased":
        return 1 / range_probability(t_range, num_timesteps)
    return len(t) / (in_timestep_range(t, t_range).sum() + 1e-10)


def innercontrol_loss(diffusion, reward, alignment, t, alpha, beta, reward_range, align_range, num_timesteps=1000,
                      reduction="unbiased"):
    """Eq. 8 per sample -> (B,):
        L_i = L_diff,i + alpha w_reward 1[t_i in R_reward] L_reward,i + beta w_align 1[t_i in R_align] L_align,i

    diffusion, reward, alignment: per-sample losses (B,); reward or alignment None leaves that term out (the rows of
    Table 2 without it). w: in_range_weight of the term's range under the reduction, over T = num_timesteps steps.

    alpha and beta weight each term's mean over the samples IN its range, as in ControlNet++ and the InnerControl
    release; the caller takes the plain batch mean, as for every loss. The expected weight of E[L | t in R] that each
    reduction gives, for t ~ U{0..T-1}, range probability P = P(R) and (micro-)batch size B:
        "unbiased" (default): exactly alpha, as E[1[t in R] L(t)] / P = E[L(t) | t in R]; it does not depend on how
            the batch is split over ranks and micro-batches (DDP averages per-rank means).
        "release": alpha (1 - (1 - P)^B): a micro-batch with N_R >= 1 samples in range gives their mean, whose
            expectation is E[L | t in R]; one with none (probability (1 - P)^B) gives 0. Depth's reward on [0, 400]
            (P = 0.401) at the release's micro-batch of 8 acts as 0.983 alpha, segmentation's on [0, 200] as 0.834
            alpha, at B = 1 as P alpha; the weight of a sample also depends on the rest of its micro-batch.
    Without any w the effective weight would be alpha P (depth's 0.5 on [0, 400] acting as 0.20) and widening a range
    would also raise its weight. A batch with no sample in range adds an exact zero that keeps the graph."""
    loss = diffusion
    if reward is not None:
        weight = in_range_weight(t, reward_range, num_timesteps, reduction)
        loss = loss + alpha * weight * timestep_masked(reward, t, reward_range)
    if alignment is not None:
        weight = in_range_weight(t, align_range, num_timesteps, reduction)
        loss = loss + beta * weight * timestep_masked(alignment, t, align_range)
    return loss


@dataclass(frozen=True)
class InnerControlTask:
    """One column of Table 4: reward weight alpha (as ControlNet++), reward range and comparison; alignment weight
    beta, range and comparison (Eq. 7 in the ControlNet's training); the comparison the probe is trained with
    (probe_kind). Ranges are inclusive [low, high] in DDPM steps of a 1000-step schedule.
    Depth's alignment compares max-normalised maps as the release does (alignment_loss), while its probe learns the
    control itself by plain MSE, the loss of the paper's probe training (appendix: "MSE, except for the segmentation
    task"; the release has no probe trainer)."""
    alpha: float
    reward_range: tuple
    reward_kind: str
    beta: float
    align_range: tuple
    alignment_kind: str
    probe_kind: str


INNERCONTROL_TASKS = {
    "depth": InnerControlTask(0.5, (0, 400), "max_normalised_mse", 1.0, (0, 920), "max_normalised_mse", "mse"),
    "hed": InnerControlTask(1.0, (0, 400), "mse", 0.1, (0, 800), "sparse_mse", "sparse_mse"),
    "lineart": InnerControlTask(10.0, (0, 200), "mse", 2.0, (0, 700), "mse", "mse"),
    "segmentation": InnerControlTask(0.5, (0, 200), "cross_entropy", 0.05, (450, 980), "cross_entropy",
                                     "cross_entropy"),
}


def innercontrol_task(name):
    if name not in INNERCONTROL_TASKS:
        raise ValueError(f"unknown InnerControl task {name!r}; known tasks: {', '.join(INNERCONTROL_TASKS)}")
    return INNERCONTROL_TASKS[name]


# The train.py fields of a ControlNet run trained with Eq. 8 that override its task's Table 4 column.
EQ8_FIELDS = {
    "alpha": (optional_float, "reward weight (none: the task's Table 4 value; 0: no reward term)"),
    "beta": (optional_float, "alignment weight (none: the task's Table 4 value; 0: no alignment term)"),
    "reward_range": (optional_timestep_range, "LOW,HIGH steps of the reward term (none: Table 4)"),
    "align_range": (optional_timestep_range, "LOW,HIGH steps of the alignment term (none: Table 4)"),
    "eq8_reduction": (str, "unbiased: each masked term times 1 / P(range), expected weight alpha | release: the "
                           "InnerControl release's in-range mean per micro-batch, expected weight alpha (1 - (1 - "
                           "P)^B)"),
}
OLD_EQ8_FIELDS = dict(eq8_reduction="unbiased")  # what runs stored before the field were trained with


def eq8_weights(settings, config, num_timesteps=1000):
    """alpha, beta, reward range, alignment range of a run: the config's EQ8_FIELDS where given, else Table 4's
    (`settings`, an InnerControlTask). A range of a term that is on and holds no step, or an unknown eq8_reduction,
    raises ValueError."""
    check_reduction(config["eq8_reduction"])
    alpha = settings.alpha if config["alpha"] is None else config["alpha"]
    beta = settings.beta if config["beta"] is None else config["beta"]
    reward_range = tuple(config["reward_range"] or settings.reward_range)
    align_range = tuple(config["align_range"] or settings.align_range)
    for weight, t_range in ((alpha, reward_range), (beta, align_range)):
        if weight:
            range_probability(t_range, num_timesteps)
    return alpha, beta, reward_range, align_range


# ---------------------------------------------------------------------------------------------------------------------
# The training step of the ControlNet (Eq. 5-8)
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class InnerControlTerms:
    """What Eq. 8 adds to the diffusion loss: alpha, the reward model D (None: no reward term), its range and
    comparison; beta, the frozen probe H (None: no alignment term), the UNet features it reads (`tap_mode`), its
    range and comparison. Ranges are inclusive DDPM steps. decode: latents -> the reward model's image (RGB in
    [0, 1]); None in pixel space. eq8_reduction: how each masked term stands for its in-range mean
    (innercontrol_loss)."""
    alpha: float
    reward_model: object
    reward_range: tuple
    reward_kind: str
    beta: float
    probe: object
    tap_mode: str
    align_range: tuple
    alignment_kind: str
    decode: object = None
    eq8_reduction: str = "unbiased"


def innercontrol_training_step(controlnet, base, schedule, terms, x0, tokens, hint, control, draws, device):
    """Per-sample InnerControl loss (Eq. 8) of a ControlNet steering the frozen base model. -> (B,)

    base: the text-to-image model, `base.text_encoder(tokens)` -> context and `base.unet(x_t, t, context,
        control=residuals, taps=...)` -> eps (and the decoder features with taps); frozen.
    x0 (B, C, H, W) real images or their latents, tokens (B, L) their captions (dropped for CFG already), hint
        (B, C_hint, H', W') the ControlNet's input control, control the exact control the reward and the alignment
        compare against (in pixel space).
    draws: each sample's generator (ref.runtime.SampleDraws): t ~ U{0..T-1}, then eps.
    The reward model (after terms.decode) and the probe run on the samples inside their ranges only (in_range_only)."""
    t = draws.randint(schedule.num_timesteps)  # (B,)
    eps = draws.randn(*x0.shape[1:])  # (B, C, H, W)
    x0, tokens, hint, control, t, eps = (tensor.to(device, non_blocking=True)
                                         for tensor in (x0, tokens, hint, control, t, eps))
    x_t = schedule.add_noise(x0, eps, t)  # sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    with torch.no_grad():
        context = base.text_encoder(tokens)  # (B, L, D_ctx)
    residuals = controlnet(x_t, hint, t, context)
    if terms.probe is None:
        eps_hat, features = base.unet(x_t, t, context, control=residuals), None
    else:
        eps_hat, features = base.unet(x_t, t, context, control=residuals, taps=terms.tap_mode)
    reward = alignment = None
    if terms.reward_model is not None:  # Eq. 5-6: D reads the control back from the one-step estimate of x0
        reward = in_range_only(lambda rows: reward_loss(terms.reward_model, schedule, x_t[rows], eps_hat[rows], t[rows],
                                                        control[rows], terms.reward_kind, terms.decode),
                               t, terms.reward_range)
    if terms.probe is not None:  # Eq. 7: H reads the control back from the decoder features
        t_emb = base.unet.embed_time(t)  # (B, D_t)
        alignment = in_range_only(lambda rows: alignment_loss(terms.probe, [feature[rows] for feature in features],
                                                              t_emb[rows], control[rows], terms.alignment_kind),
                                  t, terms.align_range)
    return innercontrol_loss(mean_squared_error(eps_hat, eps), reward, alignment, t, terms.alpha, terms.beta,
                             terms.reward_range, terms.align_range, schedule.num_timesteps,
                             terms.eq8_reduction)  # Eq. 8
