"""One registry per component kind.

Registering a component makes it (a) a gin configurable under `<kind>.<name>` (so `.gin` files can
write `@time_samplers.uniform_segmented()` or, when unambiguous, `@uniform_segmented()`) and
(b) listable with `python -m decm.launch --list`.
"""

from __future__ import annotations

import gin

KINDS = (
    "time_samplers",
    "selectors",
    "losses",
    "n2n_variants",
    "guidance",
    "teachers",
    "samplers",
    "backbones",
    "datasets",
    "objectives",
    "metrics",
)

_REGISTRY: dict[str, dict[str, object]] = {kind: {} for kind in KINDS}


def register(kind: str, name: str | None = None, denylist: tuple[str, ...] = ()):
    """Decorator: registers `obj` under `kind` and with gin as `kind.name`.

    Args:
      kind: one of `KINDS`.
      name: registry (and gin) name; defaults to the object's `__name__`.
      denylist: constructor arguments gin may not bind (runtime-only inputs).
    """
    if kind not in _REGISTRY:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")

    def wrap(obj):
        key = name or obj.__name__
        if key in _REGISTRY[kind]:
            raise ValueError(f"{kind}.{key} is registered twice")
        configured = gin.configurable(key, module=kind, denylist=list(denylist))(obj)
        _REGISTRY[kind][key] = configured
        return configured

    return wrap


def get(kind: str, name: str):
    """Returns the registered component `kind.name`, with a one-line error listing the choices."""
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        choices = ", ".join(sorted(_REGISTRY.get(kind, {})))
        raise KeyError(f"unknown {kind} component {name!r}; choices: {choices}") from None


def names(kind: str) -> list[str]:
    """Sorted registered names of one kind."""
    return sorted(_REGISTRY[kind])


def one_line_doc(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else "(undocumented)"


def listing() -> str:
    """Human-readable table of every kind, name and one-line doc (for `--list`)."""
    import_all()
    lines = []
    for kind in KINDS:
        lines.append(f"{kind}:")
        for key in names(kind):
            lines.append(f"  {key:<24} {one_line_doc(_REGISTRY[kind][key])}")
    return "\n".join(lines)


def all_components():
    """Yields (kind, name, obj) for every registered component."""
    import_all()
    for kind in KINDS:
        for key in names(kind):
            yield kind, key, _REGISTRY[kind][key]


def import_all() -> None:
    """Imports every module that registers components (idempotent)."""
    # Imported for their registration side effects.
    from decm import data, method, models, sampling  # noqa: F401
    from decm.eval import metrics  # noqa: F401
