"""Evaluation: CPU-scale distribution distances and torch-fidelity feature metrics."""
