"""Evolutionary recipe search: parameter space and data-flow space (Akiba et al.)."""
