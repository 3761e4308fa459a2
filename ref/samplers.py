"""Samplers. Each takes a plain callable `denoise(x, t) -> prediction`, so guidance composes outside (ref/guidance.py).

Flow family (t = 1 noise -> t = 0 data; the callable returns the velocity v, see ref/schedules.py):
  - `heun`: deterministic 2nd-order solver of the probability-flow ODE dx/dt = v (EDM, Karras et al. 2022, Alg. 1),
    on a uniform grid, EDM's `rho_grid` or LightningDiT's `shifted_grid`.
  - `euler_maruyama`: the reverse SDE dx = [v - (g^2 / 2) score] dt + g dW with the final mean step; the diffusion
    g(t)^2 = 2t of REPA and the Internal Guidance release (`ig_diffusion`), or SiT's "SBDM" form (`sbdm_diffusion`).
  The state is integrated in float64; the network is called in its own dtype (`model_dtype`).
DDPM family (integer timesteps; the callable returns eps, x0 or v as `prediction` says):
  - `ddpm_ancestral` (Ho et al. 2020, Alg. 2; optionally respaced and with the learned variance of ADM / DiT),
    `ddim` (Song et al. 2021, Eq. 12, eta = 0 deterministic) and
  - `unipc`: the multistep UniPC predictor-corrector (Zhao et al. 2023) in the configuration diffusers'
    UniPCMultistepScheduler takes by default (order 2, B(h) = e^h - 1, x0 prediction, lower-order final step).

Randomness comes from `randn_like` (default torch.randn_like), so callers can draw per-sample seeded noise.
"""
import torch

from ref.schedules import FlowSchedule

FLOW = FlowSchedule()


# ---------------------------------------------------------------------------------------------------------------------
# Time grids for the flow family (descending, ending at t = 0)
# ---------------------------------------------------------------------------------------------------------------------

def uniform_grid(steps, t_max=1.0, t_min=0.04):
    """SiT's Euler-Maruyama grid: `steps` points from t_max to t_min, then 0 (the last interval is the mean step)."""
    return torch.cat([torch.linspace(t_max, t_min, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def rho_grid(steps, t_max=1.0, t_min=0.002, rho=7.0):
    """EDM's rho formula (Karras et al. 2022, Eq. 5) applied to t itself: `steps` points from t_max to t_min, dense
    near the data end, then 0. Not EDM's own grid: EDM spaces sigma = t / (1 - t) of this interpolant (t_max = 1 is
    sigma = inf there), while this spaces t; it is the toy's Heun grid, not a reproduction of EDM's schedule."""
    i = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    t = (t_max ** (1 / rho) + i * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def shifted_grid(steps, shift):
    """LightningDiT's timestep shift (hustvl/LightningDiT, kept by the IG release: transport/integrators.py, class
    `ode`, `compute_tm`): its uniform grid t_n = n / steps in its time (0 noise -> 1 data) is mapped to
    t_m = shift t_n / (1 + (shift - 1) t_n). Here t = 1 - t_m; with u = 1 - t_n the same map reads
        t = u / (shift + (1 - shift) u),
    SD3's shift a u / (1 + (a - 1) u) with a = 1 / shift. shift 1: uniform; shift < 1 (the release's 0.3) puts the
    steps near the noise end. -> (steps + 1,) float64 from 1 down to 0."""
    if shift <= 0:
        raise ValueError(f"the timestep shift must be positive (1: uniform), got {shift}")
    u = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return u / (shift + (1 - shift) * u)


def _call(denoise, x, t, model_dtype):
    """Run the network on x in its own dtype and hand back float64; t becomes a (N,) tensor of at least float32 (in
    bf16 a DDPM step 981 would read as 980, a flow time 0.996 as 1)."""
    t_dtype = torch.promote_types(model_dtype, torch.float32)
    t_batch = torch.full((x.shape[0],), float(t), dtype=t_dtype, device=x.device)
    return denoise(x.to(model_dtype), t_batch).to(torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# Flow family
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def heun(velocity, noise, grid, model_dtype=torch.float32, euler_last=True):
    """Probability-flow ODE dx/dt = v(x, t) from grid[0] to grid[-1] = 0 with Heun steps; with euler_last the step
    into t = 0 is a plain Euler step (EDM Alg. 1), without it a Heun step like the others, which evaluates the network
    at t = 0 (torchdiffeq's fixed-grid "heun2", the LightningDiT release's ODE sampler). Network evaluations:
    2 * (len(grid) - 1), one fewer with euler_last."""
    x = noise.to(torch.float64)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t_cur  # negative
        d_cur = _call(velocity, x, t_cur, model_dtype)
        x_euler = x + h * d_cur
        if t_next == 0 and euler_last:
            x = x_euler
        else:
            d_next = _call(velocity, x_euler, t_next, model_dtype)
            x = x + h * 0.5 * (d_cur + d_next)
    return x


def ig_diffusion(t):
    """g(t)^2 = 2t: `compute_diffusion` of REPA's and the IG release's samplers.py (SiT/samplers.py), the production
    setting of the IG paper's numbers. SiT's sample.py default, diffusion form "sigma" (w_t = sigma_t in its reversed
    time), is the same g(t)^2 = 2t written in t = 1 noise."""
    return 2 * t


def sbdm_diffusion(t):
    """g(t)^2 = 2t / (1 - t): SiT's "SBDM" form (w_t = the drift variance of its linear path, (1 - s) / s at its time
    s = 1 - t), the default of its transport.Sampler.sample_sde, not of its sample.py. Infinite at t = 1, so SiT starts
    its grid at t = 1 - sample_eps = 1 - 1e-3 (SBDM_T_MAX)."""
    return 2 * t / (1 - t)


SBDM_T_MAX = 1 - 1e-3
DIFFUSIONS = {"ig": ig_diffusion, "sbdm": sbdm_diffusion}


@torch.no_grad()
def euler_maruyama(velocity, noise, grid, model_dtype=torch.float32, randn_like=torch.randn_like,
                   diffusion=ig_diffusion):
    """Reverse SDE dx = [v - (g^2 / 2) score] dt + g dW, score from v (ref/schedules.py), from grid[0] to
    grid[-1] = 0; diffusion(t) -> g(t)^2 (`ig_diffusion` = 2t, `sbdm_diffusion`). The last interval is one
    deterministic mean step (no noise), as in the SiT and IG releases. Network evaluations: len(grid) - 1."""
    x = noise.to(torch.float64)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        h = t_cur - t_next  # positive: we move backwards in t
        v = _call(velocity, x, t_cur, model_dtype)
        g2 = diffusion(t_cur)
        x = x - h * (v - g2 / 2 * FLOW.score_from_v(x, v, t_cur))
        if t_next > 0:
            x = x + (g2 * h).sqrt() * randn_like(x)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# DDPM family
# ---------------------------------------------------------------------------------------------------------------------

def spaced_timesteps(schedule, steps):
    """`steps` integer timesteps evenly spread over [0, T), descending (the DDIM "uniform" skip)."""
    return torch.linspace(schedule.num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()


def leading_timesteps(num_timesteps, steps, offset=1):
    """The "leading" spacing of Stable Diffusion's DDIM sampling (diffusers' DDIMScheduler.set_timesteps with
    timestep_spacing "leading" and SD1.5's steps_offset 1): k * (T // steps) + offset for k = steps - 1, ..., 0,
    descending. T = 1000, 50 steps: 981, 961, ..., 21, 1."""
    if not 1 <= steps <= num_timesteps or (steps - 1) * (num_timesteps // steps) + offset >= num_timesteps:
        raise ValueError(f"{steps} leading steps with offset {offset} do not fit in {num_timesteps} timesteps")
    return torch.arange(steps - 1, -1, -1, dtype=torch.long) * (num_timesteps // steps) + offset


def linspace_timesteps(num_timesteps, steps):
    """The "linspace" spacing of diffusers' UniPCMultistepScheduler.set_timesteps (diffusers 0.42.1,
    schedulers/scheduling_unipc_multistep.py:351-357): the points k (T - 1) / steps for k = steps, ..., 1 (computed as
    numpy's linspace computes them, k times the spacing) rounded half to even; k = 0 is left out and no steps_offset
    is added. T = 1000, 20 steps: 999, 949, 899, .., 549, 500, 450, .., 50. -> (steps,) int64, descending"""
    if not 1 <= steps < num_timesteps:
        raise ValueError(f"{steps} linspace steps do not fit in {num_timesteps} timesteps (1 .. {num_timesteps - 1})")
    k = torch.arange(steps, 0, -1, dtype=torch.float64)
    return (k * ((num_timesteps - 1) / steps)).round().long()


def respaced_timesteps(num_timesteps, count):
    """The timesteps ADM's and DiT's `space_timesteps(num_timesteps, str(count))` keep (one section): round(i * stride)
    for i < count, stride = (T - 1) / (count - 1), summed and rounded as they do (Python's round, half to even), so the
    same steps come out; ascending. DiT's sample.py: count 250 of 1000."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} timesteps to {count}")
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    kept, position = [], 0.0
    for _ in range(count):
        kept.append(round(position))
        position += stride
    return kept


@torch.no_grad()
def ddim(denoise, noise, schedule, timesteps, prediction="eps", eta=0.0, model_dtype=torch.float32,
         randn_like=torch.randn_like, clip_x0=None, final_abar=1.0):
    """DDIM (Song et al. 2021, Eq. 12): x_prev = alpha_prev x0 + sqrt(sigma_prev^2 - s^2) eps + s z with
    s = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev); eta = 0 is deterministic.
    The last step goes to abar_prev = final_abar: 1 (the default) makes the sample the final x0 estimate; SD's
    DDIMScheduler with set_alpha_to_one False steps to abar_0 instead (final_abar = schedule.abar(0)).
    clip_x0: (low, high), the data range of a pixel-space model: each x0 estimate is clamped to it and eps re-derived
    from the clamped x0 (guided-diffusion's clip_denoised), so an early estimate far outside the range cannot
    saturate the sample; None (latent models) leaves them as they are."""
    x = noise.to(torch.float64)
    for i, t in enumerate(timesteps):
        x0, eps = schedule.x0_eps(x, _call(denoise, x, t, model_dtype), int(t), prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(*clip_x0)
            eps = schedule.eps_from_x0(x, x0, int(t))
        last = i + 1 == len(timesteps)
        abar = schedule.abar(t)
        abar_prev = torch.as_tensor(final_abar, dtype=torch.float64) if last else schedule.abar(timesteps[i + 1])
        s = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev - s ** 2).sqrt() * eps
        if eta > 0:
            x = x + s * randn_like(x)
    return x


@torch.no_grad()
def ddpm_ancestral(denoise, noise, schedule, prediction="eps", model_dtype=torch.float32,
                   randn_like=torch.randn_like, model_timesteps=None, learned_variance=False):
    """Ancestral sampling over every step of `schedule` (Ho et al. 2020, Alg. 2), written through the posterior
    q(x_{t-1} | x_t, x0) of Eq. 6-7: mean = c0 x0 + ct x_t, variance beta_tilde = beta_t (1 - abar_{t-1}) /
    (1 - abar_t).
    model_timesteps: the timestep the network is given at each step, for a respaced schedule
        (DDPMSchedule.respaced; ADM's timestep_map); None: the step itself.
    learned_variance: the network returns 2C channels, its prediction then the variance values of
        DDPMSchedule.learned_log_variance (ADM / DiT "learned range"), which replace beta_tilde.
    At the last step the sample is the x0 estimate (the posterior mean there)."""
    x = noise.to(torch.float64)
    for t in range(schedule.num_timesteps - 1, -1, -1):
        model_t = t if model_timesteps is None else model_timesteps[t]
        output = _call(denoise, x, model_t, model_dtype)  # (N, C or 2C, ...)
        if learned_variance:
            output, variance_values = output.chunk(2, dim=1)
        x0, _ = schedule.x0_eps(x, output, t, prediction)
        if t == 0:
            return x0
        beta, abar, abar_prev = schedule.betas[t], schedule.abar(t), schedule.abar(t - 1)
        mean = (abar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - abar_prev) * x) / (1 - abar)
        if learned_variance:
            std = (0.5 * schedule.learned_log_variance(variance_values, t)).exp()
        else:
            std = schedule.posterior_variance(t).sqrt()
        x = mean + std * randn_like(x)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models")
# ---------------------------------------------------------------------------------------------------------------------

def _unipc_weights(ratios, hh):
    """The weights rho_k of the differences D_k with ratios r_k (UniPC's order conditions, Theorem 3.1 / Corollary 3.2):
    the Vandermonde system sum_k rho_k r_k^(j-1) = b_j, j = 1..K, with b_j = j! hh phi_{j+1}(hh) / B(hh),
    phi_1(z) = (e^z - 1) / z, phi_{j+1}(z) = (phi_j(z) - 1 / j!) / z, B(hh) = e^hh - 1 ("bh2" of the UniPC release
    and diffusers). One difference takes rho = 1/2 instead, as the UniPC release and diffusers do for the order-2
    predictor and the order-1 corrector (scheduling_unipc_multistep.py:938 and :1076). hh: minus the step in log-SNR
    (x0 prediction)."""
    if len(ratios) <= 1:
        return [0.5] * len(ratios)
    b_of_h = torch.expm1(hh)
    g = b_of_h / hh - 1  # hh phi_2(hh)
    factorial, b = 1, []
    for j in range(1, len(ratios) + 1):
        b.append(g * factorial / b_of_h)  # j! hh phi_{j+1}(hh) / B(hh)
        factorial *= j + 1
        g = g / hh - 1 / factorial  # hh phi_{j+2}(hh)
    r = torch.stack(ratios)
    return torch.linalg.solve(torch.stack([r ** power for power in range(len(ratios))]), torch.stack(b))


def _unipc_update(x, s, t, x0, others, alpha, sigma, lam):
    """One UniPC step in its data-prediction form from grid point s to t (log-SNR lam, h = lam_t - lam_s):
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) (x0_s + sum_k rho_k D_k),  D_k = (x0_k - x0_s) / r_k,
    r_k = (lam_k - lam_s) / h for the points k in `others`. UniP (the predictor): the earlier points; UniC (the
    corrector): the earlier points and t itself (r = 1), whose x0 comes from the network at the predicted x_t.
    Without differences this is DDIM written in x0 (DPM-Solver++(1)); B(h) = e^-h - 1 multiplies the sum (bh2)."""
    h = lam[t] - lam[s]
    ratios = [(lam[k] - lam[s]) / h for k in others]
    weights = _unipc_weights(ratios, -h)
    correction = sum(w * (x0[k] - x0[s]) / r for w, r, k in zip(weights, ratios, others))
    return sigma[t] / sigma[s] * x - alpha[t] * torch.expm1(-h) * (x0[s] + correction)


@torch.no_grad()
def unipc(denoise, noise, schedule, timesteps, prediction="eps", model_dtype=torch.float32, order=2):
    """Multistep UniPC (Zhao et al. 2023): UniP-p predicts x at the next timestep from the x0 estimates of the last p
    points; once the network has seen that prediction, UniC-p corrects it with the new x0 estimate (one network
    evaluation a step: the next predictor starts from the corrected sample with the x0 estimate the network made at
    the uncorrected one). The configuration is what diffusers' UniPCMultistepScheduler.from_config(SD1.5's scheduler
    config) yields (0.42.1, schedulers/scheduling_unipc_multistep.py: defaults :206-223, step :1153-1232): order 2,
    predict_x0 (the history holds x0 estimates, :795-800), solver_type bh2 (B(h) = e^h - 1, :921), lower_order_final
    (order min(order, i + 1, n - i) at step i: one at the first and the last, :1208-1213), no step without corrector
    (disable_corrector [], the corrector at every step after the first, :1188), final sigma 0 (final_sigmas_type
    "zero", :458): the last step lands on the x0 estimate. The grid points are `timesteps` (linspace_timesteps for
    the diffusers configuration) and the end point abar = 1. Network evaluations: len(timesteps).
    The releases pin no diffusers version (requirements.txt: `diffusers`). Before diffusers PR #7517 (April 2024,
    `final_sigmas_type`) the end point repeated the last timestep's sigma, so the last update was a zero-length step
    and the sample kept that timestep's noise; with a diffusers of that time their images differ from these there."""
    abar = torch.cat([schedule.abar(torch.as_tensor(timesteps)), torch.ones(1, dtype=torch.float64)])  # (n + 1,)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = alpha.log() - sigma.log()  # log-SNR / 2; +inf at the end point
    steps = len(timesteps)
    x, x0, previous = noise.to(torch.float64), [], None
    for i, t in enumerate(timesteps):
        x0.append(schedule.x0_eps(x, _call(denoise, x, t, model_dtype), int(t), prediction)[0])
        if previous is not None:  # UniC: correct the predicted x with its own x0 estimate
            x_start, used = previous
            x = _unipc_update(x_start, i - 1, i, x0, [*used, i], alpha, sigma, lam)
        used = [i - k for k in range(1, min(order, i + 1, steps - i))]  # UniP: the earlier points it uses
        previous = (x, used)
        x = _unipc_update(x, i, i + 1, x0, used, alpha, sigma, lam)
    return x
