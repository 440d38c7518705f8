"""Fitting samplers to a frozen model: teachers, searched and learned grids, learned tables."""
