"""Benchmark zoo: real data (and later models) for evaluating merge methods offline."""
