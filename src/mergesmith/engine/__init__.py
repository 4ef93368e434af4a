"""The streaming engine: :mod:`~mergesmith.engine.plan` turns a recipe and its sources into jobs (one per output
tensor), :mod:`~mergesmith.engine.execute` runs the method's rule over them on a bounded pool into a sink."""
