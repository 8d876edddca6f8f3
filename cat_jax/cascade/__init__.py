"""Cascade evaluation from per-example records: pure functions on records.

records (ModelOutputs, SplitRecords) and store (their files) -> rules (scores; posthoc for the
learned rules), agreement (ABC) and tiers (k-tier costs and frontiers) -> curves (two-model sweeps)
and calibration (budgets) -> plan (what to compute) and analysis (computing it) -> summary, plots
and report (the files). speculative/ holds the speculative cascades' rules on next-token
distributions, their cost and report.

Its jobs live in `cat_jax/jobs/`: `cascade_eval` (decode with every model, record, analyse),
`cascade_analyse` (re-analysis from records), `cascade_compare` (across seeds) and
`speculative_eval`; the speculative decoding loop is `cat_jax.decoding.speculative`.
(`analyse.py` and `compare.py` here are aliases of the binaries, kept for one release.)
"""
