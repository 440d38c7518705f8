"""Evaluation: discretisation error against a reference solve, distribution metrics."""
