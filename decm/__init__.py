"""decm: distil flow-matching models into few-step flow maps with the Dual-End Consistency Model."""

__version__ = "0.1.0"
