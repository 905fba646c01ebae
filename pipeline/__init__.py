"""Prefect orchestration of the DVC pipeline: the ``retrain`` flow, its schedule and deployments.

The flow runs the stages of ``dvc.yaml`` through DVC, one Prefect task per stage; DVC decides what
is stale and runs ``contrastive <stage>``. Start with :mod:`pipeline.retrain`.
"""
