"""Tensor operations the rules share: task vectors, selection, sparsifiers, sign election, the TIES trim and the
generalized task-arithmetic pipeline. No parameter schemas and no registry: those are the methods'."""
