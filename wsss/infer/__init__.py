"""``python -m wsss.infer``: predictions and pseudo labels as palette PNGs (SPEC §4 "Test set").

The command line lives in :mod:`wsss.infer.__main__`; the engine is :mod:`wsss.eval.export`."""
