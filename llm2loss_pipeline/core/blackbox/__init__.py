"""The black box `f`: the built-in identity classifier, the user's own model, and the loss pass.

Names are imported lazily so that reading the configuration (`blackbox.config`) does not pull in
torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlackBoxConfig": "config",
    "build_model": "cnn",
    "ResizeToUint8": "cnn",
    "ResizeToFloat": "cnn",
    "IMAGE_MEAN": "cnn",
    "IMAGE_STD": "cnn",
    "train_classifier": "train",
    "TrainResult": "train",
    "EpochStats": "train",
    "LoadedModel": "checkpoint",
    "save_black_box": "checkpoint",
    "load_black_box": "checkpoint",
    "plot_training_curve": "checkpoint",
    "UserModelError": "user_model",
    "load_entry_point": "user_model",
    "load_torchscript": "user_model",
    "load_user_model": "user_model",
    "LabelMapError": "labels",
    "builtin_label_map": "labels",
    "read_label_map": "labels",
    "map_labels": "labels",
    "num_outputs_needed": "labels",
    "LOSS_SCHEMA": "losses",
    "LossResult": "losses",
    "compute_losses": "losses",
    "true_class_auroc": "losses",
    "TASK_LOSSES": "losses",
    "LossTableError": "loss_table",
    "read_loss_table": "loss_table",
    "split_loss_table": "loss_table",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
