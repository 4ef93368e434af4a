"""Drivers: what calls the merge engine many times (continual merging; recipe search)."""
