"""DE-CM loss terms. Each returns a per-sample loss of shape (B,); the objective weights and reduces.

Every term follows the same pattern (EDM2 / sCM / MeanFlow): a stop-gradient target computed without
a graph (teacher calls and JVPs on the unwrapped student), then one with-grad student forward, then
a per-sample squared error. `target(ctx, t, s)` is exposed separately so tests and analysis can
compare targets directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from decm.method.n2n import tangent_derived
from decm.method.shapes import bcast, per_sample_norm
from decm.registry import register


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1)


class LossTerm(nn.Module):
    """Base: `loss(ctx, t, s) -> (B,)`; `target(ctx, t, s) -> (student input, target)` for tests."""

    def target(self, ctx, t, s):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, ctx, t, s):
        x, tgt = self.target(ctx, t, s)
        pred = ctx.predict(x, t, s)
        tgt = ctx.sanitize(tgt, pred)
        return self.reduce(per_sample_mse(pred, tgt), t)

    def reduce(self, err, t):
        return err


def robust(err: torch.Tensor, c: float, q: float) -> torch.Tensor:
    """Robust (adaptive) normalisation e / sg((e + c)^q) (FACM q = 0.5; MeanFlow p = 1)."""
    return err / (err.detach() + c) ** q


class LogVarianceWeight(nn.Module):
    """Learned per-time log-variance u(t) for exp(−u)·e + u (sCM / EDM2 adaptive weighting).

    u(t) = Linear(Fourier features of t), zero-initialised (u = 0 at step 0). The Fourier frequencies
    are a function of `seed` alone (their own generator, never the global RNG, which is drawn before
    `train.seed` applies), and a saved buffer, so a resumed run reads the ones it trained with.

    Args:
      features: number of Fourier features (cos and sin halves).
      seed: seed of the frequency draw.
    """

    def __init__(self, features: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(features // 2, generator=g) * 4.0)
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t):
        ang = 2 * math.pi * t.float().unsqueeze(1) * self.freqs.unsqueeze(0)
        return self.linear(torch.cat([ang.cos(), ang.sin()], 1)).squeeze(1)


@register("losses", "cm_loss")
class CMLoss(LossTerm):
    """L_cm, continuous-time consistency on (t, s = 1) along the teacher ODE.

    v̄ = v_φ + (1 − t)·dF⁻/dt, dF⁻/dt = ∇ₓF⁻·v_φ + ∂ₜF⁻ (one JVP, tangent (v_φ, 1, 0) on (x, t, s));
    g = F⁻ − v̄. Targets:
      - 'plain': F⁻ − g (= v̄).
      - 'facm': F⁻ − α(t)·clamp(g, −κ, κ), α = 1 − t^p (ali-vilab/FACM `losses.py`, `FACMLoss`).
      - 'scm': F⁻ − g′/(‖g′‖ + c), g′ = cos(πt/2)·g ('cos' tangent weight) or g ('none'). FACM's sCM
        reimplementation (`losses.py`, `sCMLoss`) multiplies g by cos(πt/2) and divides by the RMS norm
        ‖g′‖/√D (`g_norm * sqrt(g_norm.numel() / g.numel())`); the sCM paper's Algorithm 1 (Lu & Song
        2024) divides by the plain L2 norm ‖g′‖ over all D dimensions (`tangent_norm = 'l2'`). On
        4×32×32 latents the two differ by √4096 = 64×.
    Reduction of the per-sample e = mean((F − target)²), in FACM's order (`norm_l2_loss(F, target) * beta`):
    first the robust normalisation e/sg((e + c)^q), then the time weight cos(πt/2), then the optional
    learned log-variance exp(−u(t))·e + u(t).

    Args:
      target: 'facm' (default), 'scm' or 'plain'.
      alpha_power: p in α(t) = 1 − t^p (FACM: 0.5).
      clamp: κ, clamp of g for the FACM target.
      tangent_norm_c: c in g/(‖g‖ + c) for the sCM target (sCM: 0.1).
      tangent_norm: 'rms' (‖g‖/√D, FACM's sCM code; default) or 'l2' (‖g‖, the sCM paper).
      tangent_weight: 'cos' (g′ = cos(πt/2)·g before normalising, FACM's sCM code; default) or 'none'.
      warmup_steps: linear warm-up of the JVP term (1 − t)·dF/dt over this many steps (0: off).
      weighting: 'cos' for cos(πt/2) (FACM) or 'none'.
      robust_c: c of the robust normalisation (≤ 0 disables it).
      robust_q: q of the robust normalisation (FACM: 0.5).
      learned_weighting: adds a learned log-variance u(t) (sCM-style adaptive weighting).
      logvar_seed: seed of the learned weighting's Fourier frequencies.
    """

    def __init__(self, target: str = "facm", alpha_power: float = 0.5, clamp: float = 1.0,
                 tangent_norm_c: float = 0.1, tangent_norm: str = "rms", tangent_weight: str = "cos",
                 warmup_steps: int = 0, weighting: str = "cos", robust_c: float = 1e-3, robust_q: float = 0.5,
                 learned_weighting: bool = False, logvar_seed: int = 0):
        super().__init__()
        if target not in ("facm", "scm", "plain"):
            raise ValueError(f"cm_loss.target must be 'facm', 'scm' or 'plain', got {target!r}")
        if weighting not in ("cos", "none"):
            raise ValueError(f"cm_loss.weighting must be 'cos' or 'none', got {weighting!r}")
        if tangent_norm not in ("rms", "l2"):
            raise ValueError(f"cm_loss.tangent_norm must be 'rms' or 'l2', got {tangent_norm!r}")
        if tangent_weight not in ("cos", "none"):
            raise ValueError(f"cm_loss.tangent_weight must be 'cos' or 'none', got {tangent_weight!r}")
        self.kind, self.alpha_power, self.clamp = target, alpha_power, clamp
        self.tangent_norm_c, self.tangent_norm, self.tangent_weight = tangent_norm_c, tangent_norm, tangent_weight
        self.warmup_steps, self.weighting = warmup_steps, weighting
        self.robust_c, self.robust_q = robust_c, robust_q
        self.logvar = LogVarianceWeight(seed=logvar_seed) if learned_weighting else None

    def jvp_terms(self, ctx, t, s):
        """(x_t, v_φ, F⁻, dF⁻/dt) at the consistency point."""
        x = ctx.point(t)
        v = ctx.velocity(x, t)
        f_minus, df_dt = ctx.jvp(x, t, s, v, torch.ones_like(t), torch.zeros_like(s))
        return x, v, f_minus, df_dt

    def target(self, ctx, t, s):
        x, v, f_minus, df_dt = self.jvp_terms(ctx, t, s)
        warm = 1.0 if self.warmup_steps <= 0 else min(1.0, ctx.step / self.warmup_steps)
        g = f_minus - (v + warm * bcast(1 - t, x) * df_dt)
        if self.kind == "plain":
            tgt = f_minus - g
        elif self.kind == "facm":
            alpha = 1 - t.clamp_min(0) ** self.alpha_power
            tgt = f_minus - bcast(alpha, x) * g.clamp(-self.clamp, self.clamp)
        else:
            tgt = f_minus - self.scm_direction(g, t)
        ctx.record("cm/residual_norm", per_sample_norm(g).mean())
        return x, tgt

    def scm_direction(self, g, t):
        """g′/(‖g′‖ + c) with g′ = cos(πt/2)·g (or g) and ‖·‖ the RMS or the L2 norm over all dimensions."""
        if self.tangent_weight == "cos":
            g = bcast(torch.cos(0.5 * math.pi * t), g) * g
        norm = per_sample_norm(g)
        if self.tangent_norm == "rms":
            norm = norm / math.sqrt(g[0].numel())
        return g / bcast(norm + self.tangent_norm_c, g)

    def reduce(self, err, t):
        if self.robust_c > 0:
            err = robust(err, self.robust_c, self.robust_q)
        if self.weighting == "cos":
            err = torch.cos(0.5 * math.pi * t).to(err) * err
        if self.logvar is not None:
            u = self.logvar(t).to(err)
            err = torch.exp(-u) * err + u
        return err

    def parts(self, ctx, t, s):
        """Supervised ‖F − v_φ‖² and self-supervised ‖F − ṽ‖², ṽ = F⁻ + (1 − t)·dF⁻/dt (eq. 8).

        At F = F⁻ the gradient of sup + self equals the gradient of the 'plain' CM loss.
        Returns (sup, self), each per-sample (B,), both with graph through one student forward.
        """
        x, v, f_minus, df_dt = self.jvp_terms(ctx, t, s)
        pred = ctx.predict(x, t, s)
        v_tilde = f_minus + bcast(1 - t, x) * df_dt
        return per_sample_mse(pred, v), per_sample_mse(pred, v_tilde)


class _CMPart(CMLoss):
    """Base of the two analysis parts: they take no options (no target, weighting or normalisation applies)."""

    def __init__(self):
        super().__init__(target="plain", weighting="none", robust_c=0.0)


@register("losses", "cm_supervised")
class CMSupervised(_CMPart):
    """Supervised part of the plain L_cm: ‖F(x_t, t, 1) − v_φ(x_t, t)‖², unweighted (analysis).

    Takes no options: the parts are defined for the 'plain' target without time weight, robust
    normalisation or learned weighting (a gin binding of one of cm_loss's options here is an error).
    """

    def forward(self, ctx, t, s):
        return self.parts(ctx, t, s)[0]


@register("losses", "cm_selfsupervised")
class CMSelfSupervised(_CMPart):
    """Self-supervised part of the plain L_cm: ‖F − sg(F⁻ + (1 − t)·dF⁻/dt)‖², unweighted — the term that diverges.

    Takes no options (see cm_supervised).
    """

    def forward(self, ctx, t, s):
        return self.parts(ctx, t, s)[1]


@register("losses", "fm_loss")
class FMLoss(LossTerm):
    """L_fm at the s = t boundary: ‖F(x_t,t,t) − v_φ‖² + w_cos·(1 − cos(F, v_φ)).

    The cosine is taken over channels (dim 1) and averaged over positions.

    Args:
      cosine_weight: w_cos (1 in DE-CM; 0 gives plain flow matching).
    """

    def __init__(self, cosine_weight: float = 1.0):
        super().__init__()
        self.cosine_weight = cosine_weight

    def target(self, ctx, t, s):
        x = ctx.point(t)
        return x, ctx.velocity(x, t)

    def forward(self, ctx, t, s):
        x, tgt = self.target(ctx, t, s)
        pred = ctx.predict(x, t, s)
        tgt = ctx.sanitize(tgt, pred)
        err = per_sample_mse(pred, tgt)
        if self.cosine_weight:
            cos = torch.nn.functional.cosine_similarity(pred, tgt, dim=1, eps=1e-8)
            err = err + self.cosine_weight * (1 - cos).reshape(cos.shape[0], -1).mean(1)
        return err


@register("losses", "n2n_loss")
class N2NLoss(LossTerm):
    """L_n2n on (r, t), r ≈ 0: ‖F(x_r,r,t) − sg(F⁻ − w′·g)‖², two-sided residual

    g = (λ+γ)·F⁻ − (γ·v_φ(x_r, r) + λ·v_ψ) − (t − r)·Ḟ⁻, v_ψ = v_φ(x_r + (t − r)F⁻, t) (a second teacher
    call at the predicted point), Ḟ⁻ one JVP of F⁻ over (x, r, t) with the chosen tangent.
    λ = 0, γ = 1 is the MeanFlow target on (r, t); γ = 0 is Lagrangian flow-map distillation.
    form='discrete' instead targets f⁻(x_r, r, t′) followed by one teacher Euler step t′ → t.

    Args:
      lam: λ (paper: 0.5).
      gamma: γ (paper: 1).
      tangent: an n2n_variants tangent function (default: the derived (γv, γ, −λ)).
      w_prime: w′(r, t), a constant (not recovered from the paper; default 1).
      form: 'continuous' (default) or 'discrete'. The discrete form uses none of lam, gamma,
        tangent and w_prime: setting any of them away from its default with form='discrete' is an
        error that names it (and discrete_dt away from its default with the continuous form).
      discrete_dt: t − t′ for the discrete form.
      robust_c: c of an optional robust normalisation (≤ 0: off, the default).
      robust_q: q of the robust normalisation.
    """

    def __init__(self, lam: float = 0.5, gamma: float = 1.0, tangent=tangent_derived, w_prime: float = 1.0,
                 form: str = "continuous", discrete_dt: float = 0.02, robust_c: float = 0.0,
                 robust_q: float = 0.5):
        super().__init__()
        if form not in ("continuous", "discrete"):
            raise ValueError(f"n2n_loss.form must be 'continuous' or 'discrete', got {form!r}")
        if form == "discrete":
            ignored = [name for name, value, default in (("lam", lam, 0.5), ("gamma", gamma, 1.0),
                                                         ("tangent", tangent, tangent_derived), ("w_prime", w_prime, 1.0))
                       if value != default]
        else:
            ignored = ["discrete_dt"] if discrete_dt != 0.02 else []
        if ignored:
            raise ValueError(f"n2n_loss: {', '.join(ignored)} not used by form={form!r}; unbind "
                             f"{' and '.join('losses.n2n_loss.' + n for n in ignored)}")
        self.lam, self.gamma, self.tangent, self.w_prime = lam, gamma, tangent, w_prime
        self.form, self.discrete_dt, self.robust_c, self.robust_q = form, discrete_dt, robust_c, robust_q

    def residual(self, ctx, r, t):
        """(x_r, g, F⁻): the two-sided residual g at F⁻ (zero for the exact flow map)."""
        x = ctx.point(r)
        v = ctx.velocity(x, r)
        dx, dr, dt = self.tangent(v, self.lam, self.gamma, r)
        f_minus, f_dot = ctx.jvp(x, r, t, dx, dr, dt)
        x_pred = x + bcast(t - r, x) * f_minus
        v_psi = ctx.velocity(x_pred, t) if self.lam else torch.zeros_like(v)
        g = (self.lam + self.gamma) * f_minus - (self.gamma * v + self.lam * v_psi) - bcast(t - r, x) * f_dot
        return x, g, f_minus

    def target(self, ctx, r, t):
        if self.form == "discrete":
            return self.discrete_target(ctx, r, t)
        x, g, f_minus = self.residual(ctx, r, t)
        ctx.record("n2n/residual_norm", per_sample_norm(g).mean())
        return x, f_minus - self.w_prime * g

    def discrete_target(self, ctx, r, t):
        x = ctx.point(r)
        t_prev = torch.maximum(r, t - self.discrete_dt)
        with torch.no_grad():
            f_prev = ctx.student_raw(x, r, t_prev, ctx.y)
            x_prev = x + bcast(t_prev - r, x) * f_prev
            v = ctx.velocity(x_prev, t_prev)
            x_t = x_prev + bcast(t - t_prev, x) * v
            span = (t - r).clamp_min(1e-6)
            tgt = (x_t - x) / bcast(span, x)
            tgt = torch.where(bcast((t - r) > 1e-6, x).bool(), tgt, ctx.velocity(x, r))
        return x, tgt

    def reduce(self, err, t):
        return robust(err, self.robust_c, self.robust_q) if self.robust_c > 0 else err


@register("losses", "meanflow_loss")
class MeanFlowLoss(LossTerm):
    """MeanFlow on (t, s) pairs: ‖F(x_t,t,s) − sg(v_φ + (s − t)·dF⁻/dt)‖², tangent (v_φ, 1, 0).

    Distilled from the teacher velocity (v_φ replaces the conditional velocity x₁ − z). Adaptive
    weighting e / sg((e + c)^p).

    Args:
      adaptive_p: p of the adaptive weight (MeanFlow: 1.0; 0 disables).
      adaptive_c: c of the adaptive weight.
    """

    def __init__(self, adaptive_p: float = 1.0, adaptive_c: float = 1e-3):
        super().__init__()
        self.adaptive_p, self.adaptive_c = adaptive_p, adaptive_c

    def target(self, ctx, t, s):
        x = ctx.point(t)
        v = ctx.velocity(x, t)
        _, df_dt = ctx.jvp(x, t, s, v, torch.ones_like(t), torch.zeros_like(s))
        return x, v + bcast(s - t, x) * df_dt

    def reduce(self, err, t):
        return robust(err, self.adaptive_c, self.adaptive_p) if self.adaptive_p > 0 else err
