"""The DE-CM objective built in Python without gin (the same defaults as gin/method/decm.gin)."""

from __future__ import annotations

from decm.method.guidance import NoGuidance
from decm.method.losses import CMLoss, FMLoss, N2NLoss
from decm.method.objective import Objective, Term
from decm.method.selectors import Consistency, Instantaneous, NoiseToNoisy
from decm.method.time_samplers import UniformSegmented


def decm_objective(lam: float = 0.5, gamma: float = 1.0, n2n_every: int = 3, nan_policy: str = "mask",
                   guidance=None) -> Objective:
    """L_cm (FACM target) + L_fm + L_n2n every `n2n_every` steps, stratified time sampling."""
    return Objective(
        terms=[Term("cm", Consistency(), CMLoss()), Term("fm", Instantaneous(), FMLoss()),
               Term("n2n", NoiseToNoisy(), N2NLoss(lam=lam, gamma=gamma), every=n2n_every)],
        time_sampler=UniformSegmented(), guidance=guidance or NoGuidance(), nan_policy=nan_policy)
