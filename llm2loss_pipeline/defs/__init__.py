"""Dagster wiring: assets by domain, resources, partitions, checks, automation, executors.

Asset functions stay thin: each calls one step in `llm2loss_pipeline.core.steps` and turns the
step's result into metadata.
"""
