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


def interval_weight(w, t, interval):
    """Piecewise-constant guidance: weight w for t inside [lo, hi], 1 (no guidance) outside. (N,) -> (N,)"""
    lo, hi = interval
    return torch.where((t >= lo) & (t <= hi), torch.as_tensor(w, dtype=t.dtype), torch.ones_like(t))


def guided_denoiser(model, y, null_y=None, w_ig=1.0, w_cfg=1.0, ig_interval=(0.0, 1.0), cfg_interval=(0.0, 1.0),
                    cfg_channels=None):
    """Wrap a network `model(x, t, y) -> (final, intermediate)` into `denoise(x, t)` with IG and/or CFG, each on its
    own interval of t: IG on each branch, then CFG,
        D = D_u^IG + s (D_c^IG - D_u^IG),   D_y^IG = D_i,y + w (D_f,y - D_i,y).
    With w_cfg != 1, the samples whose t lies in cfg_interval also run the unconditional branch (label `null_y`), in
    the same batched evaluation; the others run the conditional one only, so a step outside the interval costs one
    network evaluation, as in the REPA / IG release samplers.
    cfg_channels: guide only the first cfg_channels channels and take the rest from the conditional branch, as the
        official DiT's and SiT's forward_with_cfg do (3 of the 4 latent channels, and DiT's variance channels); None:
        every channel.
    This is the one guidance entry point every model uses."""
    if w_cfg != 1.0 and null_y is None:
        raise ValueError("CFG (w_cfg != 1) needs the null label null_y of a model trained with label dropout")
    cfg_lo, cfg_hi = cfg_interval

    def denoise(x, t):  # x: (N, ...), t: (N,)
        n, per_sample = len(x), (-1,) + (1,) * (x.ndim - 1)
        guided = (t >= cfg_lo) & (t <= cfg_hi) & (w_cfg != 1.0)  # (N,) the samples that also run unconditionally
        labels = y
        if guided.any():  # G = guided.sum() unconditional rows after the N conditional ones
            x, t = torch.cat([x, x[guided]]), torch.cat([t, t[guided]])
            labels = torch.cat([y, torch.full_like(y[guided], null_y)])
        final, intermediate = model(x, t, labels)  # (N + G, ...) each
        if w_ig != 1.0:
            final = internal_guidance(final, intermediate, interval_weight(w_ig, t, ig_interval).reshape(per_sample))
        out, uncond = final[:n], final[n:]  # (N, ...), (G, ...)
        if len(uncond):
            out = out.clone()
            out[guided, :cfg_channels] = cfg(out[guided, :cfg_channels], uncond[:, :cfg_channels], w_cfg)
        return out

    return denoise


def controlled_denoiser(unet, controlnet, context, null_context, hint, cfg_scale, control_scale=1.0):
    """denoise(x, t) -> eps for a sampler: the UNet steered by the ControlNet's residuals for `hint` (B, C, H, W),
    each times control_scale; the text `context` (B, L, D) guided against `null_context` (1, L, D), the empty
    caption's, with weight cfg_scale (1: the text branch alone, one pass), the control in both branches (ControlNet's
    samplers, ControlNet++'s evaluation). controlnet None: the UNet alone (the hint is not read). x and hint are given
    to the networks in the UNet's dtype; eps comes back float32."""
    dtype = next(unet.parameters()).dtype
    hint = hint.to(dtype)

    def eps(x, t, context, hint):
        residuals = None if controlnet is None else controlnet(x, hint, t, context, scales=control_scale)
        return unet(x, t, context, control=residuals).float()

    def denoise(x, t):  # x (B, C_latent, h, w), t (B,) float32
        x = x.to(dtype)
        if cfg_scale == 1.0:
            return eps(x, t, context, hint)
        null = null_context.expand(len(x), -1, -1)
        cond, uncond = eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null]),
                           torch.cat([hint, hint])).chunk(2)
        return cfg(cond, uncond, cfg_scale)
    return denoise
