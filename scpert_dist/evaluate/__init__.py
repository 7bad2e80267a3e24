"""Evaluation (accuracy): the Predictor contract (predictor.py), metrics (the paper's Table 2 six + logFC/rank/energy
metrics with bootstrap CIs over drugs), the baselines (baselines/, registered by name in `registry.PREDICTORS`; CPA
through cpa-tools in its own Python 3.10 env), the accuracy benchmark on held-out drugs (accuracy.py: the table the
README and benchmarks/RESULTS.md report, `scpert benchmark`), the frozen headline (headline.py), the real-data
evaluations (bulk.py, pseudobulk.py), plots. Throughput benchmarks are `scpert_dist/bench/`."""
