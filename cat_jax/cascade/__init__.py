"""Cascade evaluation from per-example records.

records (ModelOutputs, SplitRecords) and store (their files) -> rules (scores; posthoc for the
learned rules), agreement (ABC) and tiers (k-tier costs and frontiers) -> curves (two-model sweeps)
and calibration (budgets) -> plan (what to compute) and analysis (computing it) -> summary, plots
and report (the files). pipeline is the cascade_eval job; analyse re-runs an analysis from records.
"""
