"""DE-CM weights and schedules (gin binding → Optuna distribution); see decm/sweep.py for the format."""

SPACE = {
    "cm/objectives.term.weight": {"type": "float", "low": 0.3, "high": 3.0, "log": True},   # L_cm weight
    "fm/objectives.term.weight": {"type": "float", "low": 0.3, "high": 3.0, "log": True},   # L_fm weight
    "n2n/objectives.term.weight": {"type": "float", "low": 0.3, "high": 3.0, "log": True},  # L_n2n weight
    "losses.n2n_loss.lam": {"type": "float", "low": 0.0, "high": 1.0},                      # λ
    "losses.n2n_loss.gamma": {"type": "float", "low": 0.5, "high": 1.5},                    # γ
    "n2n/objectives.term.every": {"type": "int", "low": 1, "high": 5},                      # N2N period, steps
    "selectors.noise_to_noisy.delta": {"type": "float", "low": 0.02, "high": 0.3, "log": True},  # initial r
    "objectives.objective.time_sampler": {"type": "categorical", "choices": [
        "@time_samplers.uniform_segmented()", "@time_samplers.logit_normal()", "@time_samplers.arctan_lognormal()"]},
    "losses.n2n_loss.tangent": {"type": "categorical", "choices": [
        "@n2n_variants.tangent_derived", "@n2n_variants.tangent_note"]},
}
