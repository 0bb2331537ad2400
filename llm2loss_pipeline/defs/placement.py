"""How model-running assets ask for accelerators on a distributed executor.

`pool="gpu"` limits how many GPU steps run at once across a deployment (set the limit with
`dagster instance concurrency set gpu N`, or `concurrency.pools` in dagster.yaml). The
`dagster-k8s/config` tag asks Kubernetes for one GPU per step when the k8s executor runs it; the
`dagster-celery/queue` tag routes the step to the Celery queue that GPU workers consume.
"""

from __future__ import annotations

import json

GPU_POOL = "gpu"

GPU_OP_TAGS: dict[str, str] = {
    "dagster-k8s/config": json.dumps(
        {
            "container_config": {
                "resources": {
                    "limits": {"nvidia.com/gpu": "1"},
                    "requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
                }
            },
            "pod_spec_config": {
                "node_selector": {"llm2loss/accelerator": "gpu"},
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ],
            },
        }
    ),
    "dagster-celery/queue": "gpu",
}
