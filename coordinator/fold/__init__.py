"""Fold: the fold policy, the pure folding math, where evaluations run, and the folder loop."""
