"""Guidance: every method here extrapolates from a weaker prediction towards a stronger one,

    D = D_weak + w * (D_strong - D_weak),                       w = 1 gives D_strong unchanged,

and they differ only in where the weaker prediction comes from. The formulas are linear, so they hold for any
parameterisation that is affine in the network output at fixed (x_t, t): eps, x0, v (flow velocity) alike.
"""
import torch


def extrapolate(weak, strong, w):
    return weak + w * (strong - weak)


def cfg(cond, uncond, w):
    """Classifier-free guidance (Ho & Salimans 2022): the weaker prediction is the unconditional one."""
    return extrapolate(uncond, cond, w)


def internal_guidance(final, intermediate, w):
    """Internal Guidance (Zhou et al. 2026): D = D_i + w (D_f - D_i), both heads of one network evaluation."""
    return extrapolate(intermediate, final, w)


def autoguidance(main, guide, w):
    """Autoguidance (Karras et al. 2024): D = D_guide + w (D_main - D_guide), the guide a smaller, shorter-trained
    model for the same condition."""
    return extrapolate(guide, main, w)


def ig_then_cfg(final_cond, intermediate_cond, final_uncond, intermediate_uncond, w_ig, w_cfg):
    """IG on each branch, then CFG: D = D_u^IG + s (D_c^IG - D_u^IG) with D_y^IG = D_i,y + w (D_f,y - D_i,y)."""
    return cfg(internal_guidance(final_cond, intermediate_cond, w_ig),
               internal_guidance(final_uncond, intermediate_uncond, w_ig), w_cfg)


def interval_weight(w, t, interval):
    """Piecewise-constant guidance: weight w for t inside [lo, hi], 1 (no guidance) outside. (N,) -> (N,)"""
    lo, hi = interval
    return torch.where((t >= lo) & (t <= hi), torch.as_tensor(w, dtype=t.dtype), torch.ones_like(t))


def guided_denoiser(model, y, null_y=None, w_ig=1.0, w_cfg=1.0, ig_interval=(0.0, 1.0), cfg_interval=(0.0, 1.0)):
    """Wrap a network `model(x, t, y) -> (final, intermediate)` into `denoise(x, t)` with IG and/or CFG, each on its
    own interval of t (IG on each branch, then CFG, as `ig_then_cfg`). With w_cfg != 1 the conditional and
    unconditional branches share one batched evaluation, the unconditional one with label `null_y`.
    This is the one guidance entry point every model uses."""
    use_cfg = w_cfg != 1.0

    def denoise(x, t):  # x: (N, ...), t: (N,)
        per_sample = (-1,) + (1,) * (x.ndim - 1)
        if use_cfg:
            x, t, labels = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_y)])
        else:
            labels = y
        final, intermediate = model(x, t, labels)  # (N or 2N, ...) each
        if w_ig != 1.0:
            final = internal_guidance(final, intermediate, interval_weight(w_ig, t, ig_interval).reshape(per_sample))
        if not use_cfg:
            return final
        (cond, uncond), (t, _) = final.chunk(2), t.chunk(2)
        return cfg(cond, uncond, interval_weight(w_cfg, t, cfg_interval).reshape(per_sample))

    return denoise
