"""Merge methods: one module each, registered on import. ``get_method(name)`` and ``all_methods()``."""

from mergesmith.methods import (  # noqa: F401  (each import registers its methods)
    adamerging,
    breadcrumbs,
    concrete,
    consensus,
    dam,
    dare,
    della,
    fisher,
    karcher,
    linear,
    model_stock,
    nuslerp,
    passthrough,
    pcb,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    tsv,
    twin,
)
from mergesmith.methods.base import (
    BasePolicy,
    MergeMethod,
    Param,
    TensorContext,
    all_methods,
    get_method,
    register,
)

__all__ = ["BasePolicy", "MergeMethod", "Param", "TensorContext", "all_methods", "get_method", "register"]
