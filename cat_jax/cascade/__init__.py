"""Cascade evaluation: per-example records, deferral rules, threshold sweeps, summaries and plots.

records (ModelOutputs, align) -> rules (compute_scores; posthoc for the learned rule) -> curves
(sweep) -> summary (summarize, file writers) and plots (PNG).
"""
