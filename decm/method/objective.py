"""The objective: weighted loss terms on selected sub-trajectory clusters.

An objective is a list of `term`s — (selector, loss, weight, every-k-steps) — plus a time sampler, the
teacher guidance and the JVP method. Ablations are a few gin lines (drop a term, change a weight).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from decm.method.guidance import NoGuidance
from decm.method.jvp import JVP_METHODS, flow_map_jvp, jvp_forward_ad, unwrap
from decm.method.shapes import at_least_fp32, bcast
from decm.method.time_samplers import UniformSegmented
from decm.registry import register


class NonFiniteTargetError(RuntimeError):
    """Raised in nan_policy='skip' when any target is non-finite (the step is skipped)."""


class Context:
    """Per-step state shared by all loss terms: the batch, the noise, memoised points and velocities.

    `point(t)` and `velocity(x, t)` are memoised by value, so terms that share the same base times
    (L_cm and L_fm both evaluate at u) share x_t and one teacher call.

    Args:
      student: the with-grad student (possibly DDP-wrapped).
      teacher: v_φ(x, t, y).
      guidance: guidance(teacher, x, t, y) → velocity.
      x1: data batch; z: noise of the same shape; y: labels or None; step: training step.
      jvp_method: 'autograd', 'forward_ad', 'forward_ad_grad' or 'fd' (decm.method.jvp).
      nan_policy: 'mask' (zero the loss of samples whose target is non-finite; a batch whose targets
        are all non-finite skips the step) or 'skip' (any non-finite target skips the step).
      generator: torch.Generator for any extra randomness.
    """

    def __init__(self, student, teacher, guidance, x1, z, y, step, jvp_method="autograd", nan_policy="mask",
                 generator=None, share: bool = True):
        self.student, self.student_raw = student, unwrap(student)
        self.teacher, self.guidance = teacher, guidance
        self.x1, self.z, self.y, self.step = x1, z, y, step
        self.jvp_method, self.nan_policy, self.generator = jvp_method, nan_policy, generator
        self._points, self._velocities = [], []  # [(key tensors, value)], matched by value
        self._predictions = []  # with-grad primals of 'forward_ad_grad' JVPs, used once by predict()
        self.selected: dict = {}  # term name → (t, s) it was evaluated on (diagnostics)
        self.share = share  # memoise points / teacher velocities across terms (False: recompute, for tests)
        self.stats: dict[str, float] = {}
        self.nan_masked = 0

    @staticmethod
    def _find(cache: list, keys: tuple):
        """Index of the cache entry whose key tensors equal `keys` (same object, or same shape and values)."""
        for i, (cached_keys, _) in enumerate(cache):
            if all(a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))
                   for a, b in zip(cached_keys, keys)):
                return i
        return None

    @classmethod
    def _lookup(cls, cache: list, keys: tuple):
        """The cached value for `keys` (matched by value), or None."""
        i = cls._find(cache, keys)
        return None if i is None else cache[i][1]

    def point(self, t):
        """x_t = (1 − t)·z + t·x₁, memoised by the value of t (terms on the same times share it)."""
        x = self._lookup(self._points, (t,)) if self.share else None
        if x is None:
            tb = bcast(t, self.x1)
            x = (1 - tb) * self.z + tb * self.x1
            self._points.append(((t,), x))
        return x

    def velocity(self, x, t):
        """Guided teacher velocity at (x, t), memoised by value: L_cm and L_fm share one teacher call."""
        v = self._lookup(self._velocities, (x, t)) if self.share else None
        if v is None:
            v = self.guidance(self.teacher, x, t, self.y)
            self._velocities.append(((x, t), v))
        return v

    def jvp(self, x, t, s, dx, dt, ds):
        """(F⁻, dF⁻) of the student at (x, t, s) along (dx, dt, ds), outside autocast (fp32 tangents).

        'forward_ad_grad' with grad enabled: one dual forward through the with-grad (possibly DDP)
        student; its primal, graph included, is kept for `predict` at the same point, and F⁻ is its
        detached copy. Every other method runs on the unwrapped student without a graph.
        """
        dtype = at_least_fp32(x.dtype)
        xc, tc, sc, dxc, dtc, dsc = (a.to(dtype) for a in (x, t, s, dx, dt, ds))
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.jvp_method == "forward_ad_grad" and torch.is_grad_enabled():
                primal, tangent = jvp_forward_ad(lambda a, b, c: self.student(a, b, c, self.y), (xc, tc, sc),
                                                 (dxc, dtc, dsc), grad=True)
                self._predictions.append(((x, t, s), primal))
                return primal.detach(), tangent
            method = "forward_ad" if self.jvp_method == "forward_ad_grad" else self.jvp_method
            return flow_map_jvp(self.student_raw, xc, tc, sc, self.y, dxc, dtc, dsc, method=method)

    def predict(self, x, t, s):
        """The with-grad student output F_θ(x, t, s): a kept 'forward_ad_grad' primal at the same point
        (used once), else one forward through the (possibly DDP-wrapped) student."""
        i = self._find(self._predictions, (x, t, s))
        if i is not None:
            return self._predictions.pop(i)[1]
        return self.student(x, t, s, self.y)

    def sanitize(self, target, pred):
        """Replaces non-finite per-sample targets by sg(pred) (zero loss, zero gradient) and counts them."""
        bad = ~torch.isfinite(target).flatten(1).all(1)
        n_bad = int(bad.sum())
        if n_bad:
            if self.nan_policy == "skip" or n_bad == len(bad):  # nothing left to learn from: skip the step
                raise NonFiniteTargetError(f"{n_bad} of {len(bad)} targets non-finite")
            self.nan_masked += n_bad
            target = torch.where(bcast(bad, target).bool(), pred.detach(), torch.nan_to_num(target))
        return target

    def record(self, name, value):
        self.stats[name] = float(value.detach() if torch.is_tensor(value) else value)


@register("objectives", "term")
class Term(nn.Module):
    """One objective entry: a loss on a selected cluster, with a weight, applied every k steps.

    Args:
      name: label used in logs (e.g. 'cm', 'fm', 'n2n').
      selector: a selectors component (consistency, instantaneous, noise_to_noisy, general_pairs).
      loss: a losses component (cm_loss, fm_loss, n2n_loss, meanflow_loss, ...).
      weight: multiplier of this term's batch-mean loss.
      every: apply on steps with step % every == 0 (paper: N2N every 3 steps).
    """

    def __init__(self, name: str, selector, loss, weight: float = 1.0, every: int = 1):
        super().__init__()
        if every < 1:
            raise ValueError(f"term {name!r}: every must be ≥ 1, got {every}")
        self.term_name, self.selector, self.loss = name, selector, loss
        self.weight, self.every = weight, every

    def active(self, step: int) -> bool:
        return self.weight != 0 and step % self.every == 0


@register("objectives", "objective")
class Objective(nn.Module):
    """Σ_terms weight · mean_batch(loss(selector(u))) with u from one time sampler per step.

    Args:
      terms: list of `term`s.
      time_sampler: draws the base times u shared by the terms' selectors.
      guidance: teacher guidance (cfg or no_guidance).
      jvp_method: 'autograd' (torch.func.jvp, no grad, unwrapped module, then a separate with-grad
        forward; the default), 'forward_ad' (the same with torch.autograd.forward_ad dual numbers),
        'forward_ad_grad' (one with-grad dual forward whose primal is the prediction: one forward
        fewer per JVP term, MATH attention in that forward) or 'fd' (float64 central difference).
      nan_policy: 'mask' (per-sample, counted) or 'skip' (the whole step, counted).
      share_teacher_calls: terms at the same (x_t, t) share one teacher call (identical losses; False
        recomputes it per term, for checks and benchmarks).
      backward_per_term: the training loop runs each term's backward right after that term's forward,
        so only one term's activations are alive at a time (peak memory ≈ one with-grad forward
        instead of one per term). Same losses; gradients equal up to float summation order (tested).
        Under DDP the terms before the last run under `no_sync`, so gradients are all-reduced once;
        under FSDP every term's backward reduce-scatters into the shards (the sharded wrapper has no
        `no_sync`), so no rank holds the whole model's gradients during the step.
    """

    def __init__(self, terms=(), time_sampler=None, guidance=None, jvp_method: str = "autograd",
                 nan_policy: str = "mask", share_teacher_calls: bool = True, backward_per_term: bool = True):
        super().__init__()
        if nan_policy not in ("mask", "skip"):
            raise ValueError(f"objective.nan_policy must be 'mask' or 'skip', got {nan_policy!r}")
        if jvp_method not in JVP_METHODS:
            raise ValueError(f"objective.jvp_method must be one of {JVP_METHODS}, got {jvp_method!r}")
        names = [t.term_name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"objective term names must be unique, got {names}")
        self.terms = nn.ModuleList(terms)
        self.time_sampler = time_sampler or UniformSegmented()
        self.guidance = guidance or NoGuidance()
        self.jvp_method, self.nan_policy, self.share_teacher_calls = jvp_method, nan_policy, share_teacher_calls
        self.backward_per_term = backward_per_term

    def uses_jvp(self) -> bool:
        from decm.method.losses import CMLoss, MeanFlowLoss, N2NLoss
        return any(isinstance(t.loss, (CMLoss, MeanFlowLoss, N2NLoss)) for t in self.terms)

    def forward(self, student, teacher, x1, y, step: int, generator: torch.Generator | None = None,
                backward: bool = False, agree=None):
        """Returns (total loss, stats dict, context). Raises NonFiniteTargetError under 'skip'.

        Args:
          student, teacher, x1, y, step, generator: the step's model, teacher, batch and randomness.
          backward: also run the backward pass, one term at a time (see `backward_per_term`); the
            returned total is then detached, and a term whose loss is non-finite raises
            NonFiniteTargetError before its backward.
          agree: a function bool → bool that makes the per-term "non-finite" verdict the same on
            every rank (decm.distributed.any_true), so all ranks skip together and none waits in an
            all-reduce the others never reach — with or without `backward` (a rank whose targets are
            non-finite must not leave the step while the others run the next term's collectives).
        """
        batch = x1.shape[0]
        z = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
        u = self.time_sampler(batch, generator).to(x1.device, torch.float32)
        ctx = Context(student, teacher, self.guidance, x1, z, y, step, self.jvp_method, self.nan_policy, generator,
                      self.share_teacher_calls)
        total = x1.new_zeros(())
        stats = {}
        active = [term for term in self.terms if term.active(step)]
        for i, term in enumerate(active):
            defer_sync = backward and i < len(active) - 1 and hasattr(student, "no_sync")
            with student.no_sync() if defer_sync else contextlib.nullcontext():
                t, s = term.selector(u, step, generator)
                t, s = t.to(x1.device), s.to(x1.device)
                ctx.selected[term.term_name] = (t, s)
                if not backward:
                    value = self._forward_term(term, ctx, t, s, agree)
                    total = total + term.weight * value
                else:
                    value = self._backward_term(term, ctx, t, s, agree)
                    total = total + term.weight * value.detach()
            stats[f"loss/{term.term_name}"] = float(value.detach())
        stats["loss/total"] = float(total.detach())
        stats["nan/masked_samples"] = ctx.nan_masked
        stats.update(ctx.stats)
        return total, stats, ctx

    @staticmethod
    def _forward_term(term, ctx, t, s, agree):
        """One term's batch-mean loss (graph kept); with `agree`, a non-finite-targets verdict is made
        the same on every rank before anything else runs, so all ranks stop at the same term."""
        try:
            value, bad = term.loss(ctx, t, s).mean(), False
        except NonFiniteTargetError:
            if agree is None:
                raise
            value, bad = None, True
        if agree is not None and agree(bad):
            raise NonFiniteTargetError(f"term {term.term_name!r}: non-finite targets; step skipped")
        return value

    @staticmethod
    def _backward_term(term, ctx, t, s, agree):
        """One term's forward and backward; returns its batch-mean loss (graph freed)."""
        try:
            value = term.loss(ctx, t, s).mean()
            bad = not bool(torch.isfinite(value.detach()))
        except NonFiniteTargetError:
            if agree is None:
                raise
            value, bad = None, True
        if agree is not None:
            bad = agree(bad)
        if bad:
            raise NonFiniteTargetError(f"term {term.term_name!r}: non-finite loss or targets; step skipped")
        with torch.autocast(device_type=ctx.x1.device.type, enabled=False):  # backward outside autocast
            (term.weight * value).backward()
        return value


def decm_objective(lam: float = 0.5, gamma: float = 1.0, n2n_every: int = 3, nan_policy: str = "mask",
                   guidance=None) -> Objective:
    """The DE-CM objective built without gin, with the defaults of gin/method/decm.gin.

    L_cm (FACM target) + L_fm + L_n2n every `n2n_every` steps, stratified time sampling.
    """
    from decm.method.losses import CMLoss, FMLoss, N2NLoss
    from decm.method.selectors import Consistency, Instantaneous, NoiseToNoisy

    return Objective(
        terms=[Term("cm", Consistency(), CMLoss()), Term("fm", Instantaneous(), FMLoss()),
               Term("n2n", NoiseToNoisy(), N2NLoss(lam=lam, gamma=gamma), every=n2n_every)],
        time_sampler=UniformSegmented(), guidance=guidance or NoGuidance(), nan_policy=nan_policy)
