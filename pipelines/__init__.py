"""Ray-facing layer of the project: data pipelines now, training, tracking and workflows later.

Everything that touches Ray or MLflow lives under this package; ``perceiver_core`` stays free of
both. Builders here return lazy objects and never call ``ray.init``: that belongs to ``jobs/``.
"""
