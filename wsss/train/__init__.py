"""Training: the loop, optimizer/schedule, checkpoints; ``python -m wsss.train``."""
