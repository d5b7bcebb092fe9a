"""Ray Data / Train / Tune jobs and MLflow tracking: thin orchestration over ``radjepa``.

Modules here import Ray at call time inside functions where practical, so ``radjepa --help``
stays instant; each job is usable as ``python -m pipelines.<job>`` inside a Ray job.
"""
