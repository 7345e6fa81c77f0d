"""Gin bindings under the names users bind them by (`distill/train.lr`, `cm/objectives.term.weight`).

gin's own `config_str()` writes the shortest unambiguous selector (`objective.terms`, `cm/term.weight`),
which neither matches what users type nor carries the component kind; code that groups or filters
bindings by kind (W&B config, the teacher cache key) uses these names instead.
"""

from __future__ import annotations


def bound_names(config: dict) -> dict:
    """gin's {(scope, selector): {param: value}} → {name as users bind it: value}.

    Registered components keep their module ('cm/objectives.term.weight', 'losses.cm_loss.target');
    the loop's configurables use their short name ('distill/train.lr', 'evaluate.n_samples'). Values
    that are not plain literals (configurable references, macros) are logged as their gin text.
    """
    import gin.config

    from decm import registry

    out = {}
    for (scope, selector), params in config.items():
        if selector.startswith("gin."):
            continue
        try:
            c = gin.config._REGISTRY.get_match(selector)  # noqa: SLF001 — gin has no public lookup
        except (KeyError, ValueError):
            c = None
        if c is not None and c.module in registry.KINDS:
            name = f"{c.module}.{c.name}"
        else:
            name = gin.config._REGISTRY.minimal_selector(selector) if c is not None else selector  # noqa: SLF001
        prefix = f"{scope}/{name}" if scope else name
        for param, value in params.items():
            out[f"{prefix}.{param}"] = value if isinstance(value, (bool, int, float, str, type(None))) else (
                list(value) if isinstance(value, (list, tuple)) and all(
                    isinstance(v, (bool, int, float, str)) for v in value) else str(value))
    return out
