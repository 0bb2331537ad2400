"""Which executor runs the steps: chosen per deployment with $LLM2LOSS_EXECUTOR.

- `multiprocess` (default): Dagster's multiprocess executor on one machine.
- `k8s`: `dagster_k8s.k8s_job_executor`, one Kubernetes job per step; GPU steps get the
  `dagster-k8s/config` requests of defs/placement.py.
- `celery`: `dagster_celery.celery_executor`, steps as Celery tasks on a broker (Redis, RabbitMQ);
  GPU steps go to the `gpu` queue (`dagster-celery/queue` tag), which only GPU workers consume.

The integrations are imported only when chosen, so the embedded default needs neither.
"""

from __future__ import annotations

import os

import dagster as dg

from llm2loss_pipeline.core.choices import one_of

EXECUTORS = ("multiprocess", "k8s", "celery")


def executor_from_env() -> dg.ExecutorDefinition:
    name = one_of(
        "LLM2LOSS_EXECUTOR", os.environ.get("LLM2LOSS_EXECUTOR", "multiprocess"), EXECUTORS
    )
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "k8s":
        # lazy: the deploy extra, installed only where chosen (+1,280 modules, 1.0 s of the load)
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    # lazy: the deploy extra, installed only where chosen
    from dagster_celery import celery_executor

    return celery_executor
