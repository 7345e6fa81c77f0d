"""DE-CM method components: time samplers, selectors, JVP, guidance, teachers, losses, objective."""

from decm.method import guidance, jvp, losses, n2n, objective, pretrain, selectors, teachers, time_samplers  # noqa: F401
