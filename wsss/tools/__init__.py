"""Command-line tools beyond train/eval (ablations, analysis)."""
