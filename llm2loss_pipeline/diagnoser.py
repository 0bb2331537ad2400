"""Ask the trained diagnosis heads questions in plain text: the public query API.

    from llm2loss_pipeline import Diagnoser

    diagnoser = Diagnoser.load()  # the latest materialization under LLM2LOSS_HOME
    diagnoser.compare("face of an old male", "face of a young female").verdict
    diagnoser.rank(["a person wearing glasses", "a person wearing a hat", "a smiling person"])
    diagnoser.discover(top=5).table  # descriptions where the model is worse, verified on samples

Thin re-exports of `llm2loss_pipeline.core.query` (where the engine and its documentation live),
so that user code does not depend on the package's internal layout.
"""

from llm2loss_pipeline.core.query import (
    CACHE_LIMIT,
    POOL_SEED,
    RUN_COMMAND,
    Diagnoser,
    DiscoveryReport,
    EncoderLoader,
    EncodeTexts,
    NotMaterializedError,
    check_texts,
    default_encoder_loader,
)

__all__ = [
    "CACHE_LIMIT",
    "POOL_SEED",
    "RUN_COMMAND",
    "Diagnoser",
    "DiscoveryReport",
    "EncodeTexts",
    "EncoderLoader",
    "NotMaterializedError",
    "check_texts",
    "default_encoder_loader",
]
