"""Evaluation: metrics (the paper's Table 2 six + sound logFC/rank/energy metrics with bootstrap CIs over drugs),
LINCS signatures for kNN, baselines implementing `baselines.base.Predictor` (control, mean_drug, random, knn_lincs,
ridge, cvae), plots. `scpert baselines setup cpa` builds the separate Python 3.10 env for cpa-tools; a CPA
predictor running in it is not implemented yet."""
