"""Fits: data, the evaluator, whole-model statistics and learned coefficients. A fit runs models on data and returns
named tensors (a :class:`~mergesmith.fit.task.FitResult`) that a method's per-tensor rule reads; it never merges
checkpoints itself and never calls the api."""
