"""Datasets: built-in 2-D distributions and the scikit-learn digits (offline), latent shards at scale."""

from decm.data import builtin  # noqa: F401
from decm.data import latents  # noqa: F401,E402
