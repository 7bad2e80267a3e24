"""The benchmark's baselines, each implementing `evaluate.predictor.Predictor`. They are registered by name in
`scpert_dist/registry.py: PREDICTORS` (a baseline that fails to import is an error when it is used, never a silent
omission); this package imports none of them, so naming a method needs no torch or scikit-learn."""
