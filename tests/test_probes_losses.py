"""Readout probe H(features, t) and the InnerControl objective: probe shapes, range, mixing and timestep conditioning;
the one-step x0 of the reward (Eq. 5); control comparisons; per-sample timestep masks; the
alignment gradient's path (Eq. 7); Eq. 8 and the Table 4 settings."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.control_losses import control_loss, labels_at
from ref.innercontrol import (INNERCONTROL_TASKS, alignment_loss, innercontrol_loss, innercontrol_task,
                              range_probability, reward_loss, timestep_masked)
from ref.probes import ReadoutProbe
from ref.schedules import DDPMSchedule

torch.set_num_threads(1)

CHANNELS = [8, 12]  # two decoder maps: (B, 8, 4, 4) and (B, 12, 8, 8)
T_EMB = 6


def tiny_probe(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(feature_channels=CHANNELS, t_emb_dim=T_EMB, out_channels=1, resolution=16, projection_channels=32)
    return ReadoutProbe(**{**config, **kwargs})


def features_and_t_emb(n=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randn(n, 8, 4, 4, generator=generator), torch.randn(n, 12, 8, 8, generator=generator)]
    return features, torch.randn(n, T_EMB, generator=generator)


# ---------------------------------------------------------------------------------------------------------------------
# Probe
# ---------------------------------------------------------------------------------------------------------------------

def test_probe_shape_tanh_range_and_logits():
    features, t_emb = features_and_t_emb()
    bounded = tiny_probe()
    with torch.no_grad():
        bounded.head[-1].weight.mul_(200)  # drive the pre-activation far outside [-1, 1]
    out = bounded(features, t_emb)
    assert out.shape == (2, 1, 16, 16)
    assert out.abs().max() <= 1 and out.abs().max() > 0.99
    logits = tiny_probe(output="logits")
    logits.load_state_dict(bounded.state_dict())
    raw = logits(features, t_emb)
    assert raw.abs().max() > 1.5  # unbounded: what tanh squashed
    torch.testing.assert_close(raw.tanh(), out)


def test_upsampling_head_doubles_the_resolution():
    features, t_emb = features_and_t_emb()
    assert tiny_probe(upsample=True)(features, t_emb).shape == (2, 1, 32, 32)
    assert tiny_probe(resolution=(8, 12), upsample=True)(features, t_emb).shape == (2, 1, 16, 24)


def test_mixing_weights_sum_to_one_and_weigh_the_maps():
    probe = tiny_probe()
    features, t_emb = features_and_t_emb()
    other_second_map = [features[0], features[1].flip(-1)]
    with torch.no_grad():
        probe.mixing_logits.copy_(torch.tensor([0.7, -1.3]))
    weights = probe.mixing_weights()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    torch.testing.assert_close(weights, torch.tensor([0.7, -1.3]).exp() / torch.tensor([0.7, -1.3]).exp().sum())
    assert not torch.allclose(probe(features, t_emb), probe(other_second_map, t_emb), atol=1e-4)
    with torch.no_grad():
        probe.mixing_logits.copy_(torch.tensor([50.0, -50.0]))  # softmax puts all weight on map 0
    torch.testing.assert_close(probe(features, t_emb), probe(other_second_map, t_emb))


def test_timestep_conditioning_changes_the_output():
    probe = tiny_probe()
    features, t_emb = features_and_t_emb()
    torch.testing.assert_close(probe(features, t_emb), probe(features, t_emb.clone()))
    assert (probe(features, t_emb) - probe(features, t_emb + 1.0)).abs().max() > 1e-3


def test_probe_names_expected_and_given_feature_channels():
    probe = tiny_probe()
    features, t_emb = features_and_t_emb()
    with pytest.raises(ValueError, match=r"channels \[8, 12\], got 2 with channels \[8, 16\]"):
        probe([features[0], torch.zeros(2, 16, 8, 8)], t_emb)


# ---------------------------------------------------------------------------------------------------------------------
# Reward: one-step x0 (Eq. 5), decode, reward model (Eq. 6)
# ---------------------------------------------------------------------------------------------------------------------

def test_one_step_x0_is_exact_for_the_true_noise():
    schedule = DDPMSchedule.named("scaled_linear")
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 4, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(5, 4, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 200, 400, 920, 999])
    seen = []

    def reward_model(image):
        seen.append(image)
        return image[:, :1]

    def decode(latent):
        return 2 * latent[:, :3]

    loss = reward_loss(reward_model, schedule, schedule.add_noise(x0, eps, t), eps, t, 2 * x0[:, :1], "mse", decode)
    torch.testing.assert_close(seen[0], 2 * x0[:, :3], rtol=0, atol=1e-10)
    assert loss.shape == (5,) and loss.max() < 1e-18
    wrong = reward_loss(reward_model, schedule, schedule.add_noise(x0, eps, t), 0 * eps, t, 2 * x0[:, :1], "mse")
    assert wrong[1:].min() > 1e-3  # a wrong eps_hat is seen: the loss tests something


# ---------------------------------------------------------------------------------------------------------------------
# Control comparisons
# ---------------------------------------------------------------------------------------------------------------------

def test_sparse_mse_hand_case():
    target = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]], [[[0.2, 0.2], [0.2, 0.2]]]])  # (2, 1, 2, 2)
    prediction = torch.tensor([[[[0.5, 0.5], [0.0, 0.0]]], [[[0.0, 0.2], [0.2, 0.6]]]])
    # sample 0: background 3 pixels, squared errors 0.25, 0, 0 -> 1/12; foreground 1 pixel, 0.25 -> mean 1/6
    # sample 1: no foreground -> its background MSE (0.04 + 0.16) / 4 = 0.05
    torch.testing.assert_close(control_loss(prediction, target, "sparse_mse"), torch.tensor([1 / 6, 0.05]))
    torch.testing.assert_close(control_loss(prediction, target, "mse"), torch.tensor([0.125, 0.05]))


def test_max_normalised_mse_ignores_the_scale():
    generator = torch.Generator().manual_seed(4)
    control = torch.rand(3, 1, 5, 5, generator=generator) + 0.1
    assert control_loss(3 * control, control, "max_normalised_mse").abs().max() < 1e-12
    assert control_loss(3 * control, control, "mse").min() > 0.1
    normalised = control / control.amax((1, 2, 3), keepdim=True)
    flat = torch.full_like(control, 0.5)  # max-normalised: all ones
    torch.testing.assert_close(control_loss(flat, control, "max_normalised_mse"),
                               (1.0 - normalised).square().mean((1, 2, 3)))


def test_cross_entropy_leaves_out_ignored_pixels():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 3.0]], [[-1.0, 0.5]]]]).repeat(2, 1, 1, 1)  # (2, 3, 1, 2)
    labels = torch.tensor([[[1, 255]], [[255, 255]]])  # sample 1: nothing labelled
    pixel0 = -(logits[0, :, 0, 0].log_softmax(0)[1])
    torch.testing.assert_close(control_loss(logits, labels, "cross_entropy"), torch.stack([pixel0, torch.tensor(0.0)]))


def test_cross_entropy_downsamples_the_labels_to_the_logits_nearest_as_controlnet_plus_plus():
    """Logits (1, 2, 2, 2), every pixel [0, log 3]: -log p = log 4 for class 0, log 4/3 for class 1. Labels 4 x 4:
    nearest downsampling (ControlNet++'s seg_label_transform) keeps the pixels (0, 0), (0, 2), (2, 0), (2, 2) = 1, 0,
    255, 1; every other pixel is class 0 and counts for nothing (logits upsampled to the labels would score 15 pixels,
    12 of them at log 4)."""
    logits = torch.stack([torch.zeros(2, 2), torch.full((2, 2), math.log(3))])[None]  # (1, 2, 2, 2)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, 0], labels[0, 2, 0], labels[0, 2, 2] = 1, 255, 1
    expected = (math.log(4 / 3) + math.log(4) + math.log(4 / 3)) / 3
    torch.testing.assert_close(control_loss(logits, labels, "cross_entropy"), torch.tensor([expected]))
    # rows / columns 0 and 2 of 4, and of 6 -> 3: 0, 2, 4 (floor(i H / h))
    torch.testing.assert_close(labels_at(torch.arange(36).reshape(1, 6, 6), (3, 3)),
                               torch.tensor([[[0, 2, 4], [12, 14, 16], [24, 26, 28]]]))


def test_bad_controls_name_the_expected_shape():
    prediction = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"control of shape \(2, 1, 16, 16\) does not match the prediction's "
                                         r"\(2, 1, 8, 8\)"):
        control_loss(prediction, torch.zeros(2, 1, 16, 16), "mse")
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\)"):
        control_loss(prediction, torch.zeros(2, 3, 8, 8), "sparse_mse")
    with pytest.raises(ValueError, match=r"\(B, H, W\), B = 2, for logits \(2, 5, 8, 8\), got torch.float32"):
        control_loss(torch.zeros(2, 5, 8, 8), torch.zeros(2, 8, 8), "cross_entropy")  # float, not class indices
    with pytest.raises(ValueError, match=r"B = 2, for logits \(2, 5, 8, 8\), got torch.int64 \(3, 8, 8\)"):
        control_loss(torch.zeros(2, 5, 8, 8), torch.zeros(3, 8, 8, dtype=torch.long), "cross_entropy")
    with pytest.raises(ValueError, match="one of"):
        control_loss(prediction, prediction, "l1")


# ---------------------------------------------------------------------------------------------------------------------
# Timestep masks and Eq. 8
# ---------------------------------------------------------------------------------------------------------------------

def test_mask_selects_exactly_the_samples_in_range():
    t = torch.tensor([0, 400, 401, 920, 999])
    per_sample = torch.tensor([1.5, 2.0, float("inf"), 4.0, 5.0], requires_grad=True)  # out of range: dropped as is
    masked = timestep_masked(per_sample, t, (0, 400))
    torch.testing.assert_close(masked, torch.tensor([1.5, 2.0, 0.0, 0.0, 0.0]), rtol=0, atol=0)
    masked.sum().backward()
    torch.testing.assert_close(per_sample.grad, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(timestep_masked(per_sample.detach(), t, (450, 980)),
                               torch.tensor([0.0, 0.0, 0.0, 4.0, 0.0]), rtol=0, atol=0)


def test_eq8_on_hand_values():
    diffusion = torch.tensor([1.0, 2.0, 3.0])
    reward = torch.tensor([10.0, 20.0, 30.0])
    alignment = torch.tensor([100.0, 200.0, 300.0])
    t = torch.tensor([100, 500, 950])
    # P([0, 399]) = 0.4 and P([0, 919]) = 0.92 under t ~ U{0..999}: the in-range terms are scaled by 1 / P
    loss = innercontrol_loss(diffusion, reward, alignment, t, 0.5, 0.1, (0, 399), (0, 919))
    torch.testing.assert_close(loss, torch.tensor([1 + 5 / 0.4 + 10 / 0.92, 2 + 0 + 20 / 0.92, 3 + 0 + 0.0]))
    torch.testing.assert_close(innercontrol_loss(diffusion, None, alignment, t, 0.5, 0.1, (0, 399), (0, 919)),
                               torch.tensor([1 + 10 / 0.92, 2 + 20 / 0.92, 3.0]))
    torch.testing.assert_close(innercontrol_loss(diffusion, reward, None, t, 0.5, 0.1, (0, 399), (0, 919)),
                               torch.tensor([1 + 5 / 0.4, 2.0, 3.0]))
    # ranges are clipped to the schedule's steps: [450, 980] of a 500-step schedule is {450..499}, P = 50 / 500
    assert range_probability((450, 980), 500) == 0.1 and range_probability((0, 920), 1000) == 0.921
    with pytest.raises(ValueError, match="holds none of the steps 0..99"):
        range_probability((450, 980), 100)


def test_eq8_weights_the_in_range_mean_as_the_release_does():
    """Over many batches, the batch mean of Eq. 8 equals the release's in-range mean (mask * loss).sum() / mask.sum()
    weighted by alpha, whatever the range's width; the same for any split of the batch over ranks."""
    generator = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (200_000,), generator=generator)
    reward = 1 + t.float() / 1000  # a loss that depends on t, so the range's mean differs from the overall mean
    for low, high in ((0, 200), (0, 920), (450, 980)):
        ours = innercontrol_loss(torch.zeros_like(reward), reward, None, t, 0.5, 0.0, (low, high), (0, 0)).mean()
        mask = ((t >= low) & (t <= high)).float()
        release = 0.5 * (mask * reward).sum() / (mask.sum() + 1e-10)
        torch.testing.assert_close(ours, release, rtol=5e-3, atol=0)
        exact = 0.5 * (1 + (low + high) / 2000)  # alpha x the in-range mean of 1 + t / 1000
        torch.testing.assert_close(ours, torch.tensor(exact), rtol=5e-3, atol=0)
    # two ranks' batch means, averaged as DDP does, equal the one-rank batch mean
    per_sample = innercontrol_loss(torch.zeros(8), reward[:8], None, t[:8], 0.5, 0.0, (0, 400), (0, 0))
    torch.testing.assert_close((per_sample[:4].mean() + per_sample[4:].mean()) / 2, per_sample.mean())


def test_release_reduction_is_the_in_range_mean_of_each_micro_batch():
    """--eq8-reduction release on a hand batch: 2 of 4 samples in the reward range [0, 400], 3 in the alignment range
    [0, 920]; the batch mean is alpha x the mean of the in-range rewards + beta x that of the in-range alignments."""
    diffusion, reward, alignment = torch.zeros(4), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([8.0, 4, 2, 1])
    t = torch.tensor([100, 300, 500, 950])
    loss = innercontrol_loss(diffusion, reward, alignment, t, 0.5, 0.1, (0, 400), (0, 920), reduction="release")
    # per sample: 0.5 x 4/2 x [1, 2, 0, 0] + 0.1 x 4/3 x [8, 4, 2, 0]
    torch.testing.assert_close(loss, torch.tensor([1 + 3.2 / 3, 2 + 1.6 / 3, 0.8 / 3, 0.0]))
    torch.testing.assert_close(loss.mean(), torch.tensor(0.5 * (1 + 2) / 2 + 0.1 * (8 + 4 + 2) / 3))
    unbiased = innercontrol_loss(diffusion, reward, alignment, t, 0.5, 0.1, (0, 400), (0, 920))
    torch.testing.assert_close(unbiased.mean(), torch.tensor((0.5 * 3 / 0.401 + 0.1 * 14 / 0.921) / 4))
    none_in_range = innercontrol_loss(diffusion, reward, None, t + 500, 0.5, 0.0, (0, 400), (0, 0), reduction="release")
    assert torch.equal(none_in_range, torch.zeros(4))  # the 1e-10 of the release: an exact 0, not 0 / 0
    with pytest.raises(ValueError, match="--eq8-reduction must be one of unbiased, release, got 'mean'"):
        innercontrol_loss(diffusion, reward, None, t, 0.5, 0.0, (0, 400), (0, 0), reduction="mean")


def test_expected_weights_of_the_two_reductions():
    """Monte Carlo over 100,000 micro-batches of B draws t ~ U{0..999}, loss 1 + t / 1000, reward range [0, 200]
    (P = 0.201, in-range mean 1.1): the release's reduction weighs the in-range mean by alpha (1 - (1 - P)^B), the
    unbiased one by alpha, whatever B (standard errors below 0.6 %)."""
    generator = torch.Generator().manual_seed(0)
    probability, in_range_mean, alpha = 0.201, 1.1, 0.5
    for micro_batch in (1, 4, 8):
        t = torch.randint(0, 1000, (100_000, micro_batch), generator=generator)
        for reduction, weight in (("release", 1 - (1 - probability) ** micro_batch), ("unbiased", 1.0)):
            batch_mean = torch.vmap(lambda row: innercontrol_loss(torch.zeros(micro_batch), 1 + row.float() / 1000,
                                                                  None, row, alpha, 0.0, (0, 200), (0, 0),
                                                                  reduction=reduction).mean())
            assert float(batch_mean(t).mean()) == pytest.approx(alpha * in_range_mean * weight, rel=0.02)


def test_alignment_averages_over_c_h_w_before_masking():
    """Two samples with 2 x 2 x 2 controls; only sample 0 is in the alignment range."""
    probe_output = torch.stack([torch.zeros(2, 2, 2), torch.ones(2, 2, 2)])  # (2, 2, 2, 2); read as 0.5 and 1.0
    control = torch.stack([torch.stack([torch.full((2, 2), 0.5), torch.ones(2, 2)]), torch.zeros(2, 2, 2)])
    per_sample = alignment_loss(lambda features, t_emb: features[0], [probe_output], None, control, "mse")
    torch.testing.assert_close(per_sample, torch.tensor([0.125, 1.0]))  # channel errors 0 and 0.25 -> mean 0.125
    t = torch.tensor([100, 950])
    batch = innercontrol_loss(torch.zeros(2), None, per_sample, t, 0.0, 1.0, (0, 400), (0, 920)).mean()
    torch.testing.assert_close(batch, torch.tensor(0.0625 / 0.921))  # (0.125 + 0) / 2 / P([0, 920])
    # The release: a per-sample mean of the pixel loss, then (mask * loss).sum() / mask.sum() over the batch.
    per_element = ((probe_output + 1) / 2 - control).square()
    mask = (t <= 920).float()
    released = (mask * per_element.mean(dim=(1, 2, 3))).sum() / (mask.sum() + 1e-10)
    torch.testing.assert_close(released, torch.tensor(0.125))  # sample 0 alone, the in-range mean


def probe_reading_as(read):
    """A stand-in probe whose tanh output reads (H + 1) / 2 = read."""
    return lambda features, t_emb: 2 * read - 1


def test_depth_alignment_max_normalises_the_channel_mean_as_the_release():
    """reward_control_aligned.py:1836-1845: (H + 1) / 2, the mean over channels, each sample / its max; the label /
    its max; the MSE. Sample 0 by hand; sample 1 is the control at half its scale on both channels: no loss."""
    read = torch.tensor([[[[0.8, 0.4], [0.0, 0.4]], [[0.4, 0.0], [0.0, 0.4]]],  # channel mean [[.6, .2], [0, .4]]
                         [[[0.25, 0.5], [0.0, 0.1]], [[0.25, 0.5], [0.0, 0.1]]]])  # (2, 2, 2, 2)
    control = torch.tensor([[[[0.5, 0.25], [0.5, 0.0]]], [[[0.5, 1.0], [0.0, 0.2]]]])  # (2, 1, 2, 2)
    loss = alignment_loss(probe_reading_as(read), None, None, control, "max_normalised_mse")
    # sample 0: [[1, 1/3], [0, 2/3]] against [[1, 1/2], [1, 0]]: squared errors 0, 1/36, 1, 4/9 -> 53/144
    torch.testing.assert_close(loss, torch.tensor([53 / 144, 0.0]))


def test_depth_alignment_normalises_at_the_probe_resolution_before_the_resize():
    """The release divides the probe's 64 px map by its maximum, then resizes it to 512 px: a peak between the
    upsampled pixels stays below 1. A 3 x 3 map peaking at its centre, doubled: the rows/columns of the bilinear
    upsampling are u = [0, 1/4, 3/4, 3/4, 1/4, 0], the peak 9/16; the control is outer(u, u), normalised to peak 1."""
    read = torch.zeros(1, 1, 3, 3)
    read[0, 0, 1, 1] = 0.5
    u = torch.tensor([0, 0.25, 0.75, 0.75, 0.25, 0])
    control = torch.outer(u, u)[None, None]  # (1, 1, 6, 6)
    loss = alignment_loss(probe_reading_as(read), None, None, control, "max_normalised_mse")
    # outer(u, u) against outer(u, u) * 16 / 9: (7 / 9)^2 x mean(u^2)^2 = 49 / 81 x (5 / 24)^2
    torch.testing.assert_close(loss, torch.tensor([49 / 81 * 25 / 576]))


def test_table4_settings_and_unknown_task():
    depth = innercontrol_task("depth")
    assert (depth.alpha, depth.reward_range, depth.beta, depth.align_range) == (0.5, (0, 400), 1.0, (0, 920))
    assert (depth.reward_kind, depth.alignment_kind, depth.probe_kind) == ("max_normalised_mse",) * 2 + ("mse",)
    hed, lineart, segmentation = (INNERCONTROL_TASKS[name] for name in ("hed", "lineart", "segmentation"))
    assert (hed.alpha, hed.beta, hed.align_range, hed.alignment_kind) == (1.0, 0.1, (0, 800), "sparse_mse")
    assert (lineart.alpha, lineart.reward_range, lineart.beta, lineart.align_range) == (10.0, (0, 200), 2.0, (0, 700))
    assert (segmentation.alpha, segmentation.beta, segmentation.align_range) == (0.5, 0.05, (450, 980))
    assert segmentation.reward_kind == segmentation.alignment_kind == "cross_entropy"
    with pytest.raises(ValueError, match="unknown InnerControl task 'canny'; known tasks: depth, hed, lineart, "
                                         "segmentation"):
        innercontrol_task("canny")


# ---------------------------------------------------------------------------------------------------------------------
# The alignment gradient reaches the ControlNet through the frozen UNet and probe
# ---------------------------------------------------------------------------------------------------------------------

class FrozenUNetStandIn(nn.Module):
    """Encoder conv, the ControlNet residual added to its output, two decoder maps (the probe's features)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 3, padding=1)
        self.decoder1 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.decoder2 = nn.Conv2d(8, 12, 3, padding=1)
        self.time_embed = nn.Linear(1, T_EMB)

    def forward(self, x, t, control_residual):
        h = self.encoder(x) + control_residual  # (B, 8, 8, 8)
        f1 = F.silu(self.decoder1(h))  # (B, 8, 4, 4)
        f2 = F.silu(self.decoder2(F.interpolate(f1, scale_factor=2.0)))  # (B, 12, 8, 8)
        return [f1, f2], self.time_embed(t[:, None].float() / 1000)


def test_alignment_gradient_reaches_the_controlnet_only():
    torch.manual_seed(5)
    controlnet = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 1))
    unet = FrozenUNetStandIn().requires_grad_(False)
    probe = tiny_probe(resolution=8).requires_grad_(False)
    frozen = {name: p.clone() for name, p in [*unet.named_parameters(), *probe.named_parameters(prefix="probe")]}
    before = [p.clone() for p in controlnet.parameters()]
    optimizer = torch.optim.SGD(controlnet.parameters(), lr=0.1)
    x, control = torch.randn(3, 3, 8, 8), torch.rand(3, 1, 8, 8)

    def eq8(t):
        features, t_emb = unet(x, t, controlnet(control))
        alignment = alignment_loss(probe, features, t_emb, control, "mse")
        return innercontrol_loss(torch.zeros(3), None, alignment, t, 0.0, 1.0, (0, 400), (0, 920)).mean()

    eq8(torch.tensor([950, 960, 999])).backward()  # no sample in range: an exact zero gradient
    assert all(p.grad is not None and not p.grad.any() for p in controlnet.parameters())
    optimizer.zero_grad()
    eq8(torch.tensor([10, 500, 999])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in controlnet.parameters())
    assert all(p.grad is None for p in [*unet.parameters(), *probe.parameters()])
    optimizer.step()
    assert all(not torch.equal(p, q) for p, q in zip(controlnet.parameters(), before))
    for name, p in [*unet.named_parameters(), *probe.named_parameters(prefix="probe")]:
        assert torch.equal(p, frozen[name]), name
