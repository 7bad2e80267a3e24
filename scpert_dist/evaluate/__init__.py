"""Evaluation: the Predictor contract (predictor.py), metrics (the paper's Table 2 six + logFC/rank/energy metrics
with bootstrap CIs over drugs), the baselines (baselines/, registered in `baselines.BASELINES`; CPA through
cpa-tools in its own Python 3.10 env), the accuracy benchmark on held-out drugs (benchmark.py), plots."""
