"""Evaluation: metrics, inference, reports; ``python -m wsss.eval``."""
from .metrics import ConfusionMatrix

__all__ = ["ConfusionMatrix"]
