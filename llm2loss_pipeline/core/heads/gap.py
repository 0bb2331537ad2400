"""The modality gap: image and text embeddings of a CLIP-style model sit in different regions.

Heads are trained on image embeddings and queried with text embeddings. In CLIP-style models the
two modalities occupy two narrow cones whose centres are far apart, so a text embedding is, to a
head, an out-of-distribution point: its raw output mostly measures "how far along the image-to-text
offset" and little of the attribute the text names. Subtracting each modality's own mean (fitted
on the training images and on a text corpus such as the captions of those images) and renormalising
moves both onto the same centred sphere, where directions that separate attributes agree across the
two.

`mode="none"` keeps the embeddings as they are (the paper's choice, useful to measure the effect).
`measure_gap_effect` trains the heads under both modes on the same data and reports how well each
recovers the measured per-attribute loss disparities, so the choice rests on a number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm2loss_pipeline.core.choices import one_of
from llm2loss_pipeline.core.heads.config import GAP_MODES

_EPS = 1e-12


def normalise(emb: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return (emb / np.maximum(norms, _EPS)).astype(np.float32)


def _as_matrix(emb: Any, dim: int | None, what: str) -> np.ndarray:
    array = np.asarray(emb, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        want = f"[n, {dim}]" if dim is not None else "[n, d]"
        raise ValueError(f"{what} must have shape {want}, got {array.shape}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise ValueError(f"{what}: row {int(np.flatnonzero(~finite)[0])} contains NaN or inf")
    return array


@dataclass(frozen=True)
class ModalityGap:
    image_mean: np.ndarray
    text_mean: np.ndarray
    mode: str = "center"

    def __post_init__(self) -> None:
        one_of("modality gap mode", self.mode, GAP_MODES)
        if self.image_mean.shape != self.text_mean.shape or self.image_mean.ndim != 1:
            raise ValueError(
                f"image_mean {self.image_mean.shape} and text_mean {self.text_mean.shape} "
                "must be vectors of the same dimension"
            )

    @property
    def dim(self) -> int:
        return int(self.image_mean.shape[0])

    @property
    def gap_norm(self) -> float:
        """Distance between the two modality centres (0 would mean no gap)."""
        return float(np.linalg.norm(self.image_mean.astype(np.float64) - self.text_mean))

    def image(self, emb: Any) -> np.ndarray:
        array = _as_matrix(emb, self.dim, "image embeddings")
        return array if self.mode == "none" else normalise(array - self.image_mean)

    def text(self, emb: Any) -> np.ndarray:
        array = _as_matrix(emb, self.dim, "text embeddings")
        return array if self.mode == "none" else normalise(array - self.text_mean)

    def tensors(self) -> dict[str, Any]:
        # lazy: torch (+930 modules, 2 s); core.query imports this module and needs no torch
        import torch

        return {
            "image_mean": torch.from_numpy(np.ascontiguousarray(self.image_mean, dtype=np.float32)),
            "text_mean": torch.from_numpy(np.ascontiguousarray(self.text_mean, dtype=np.float32)),
        }

    def meta(self) -> dict[str, Any]:
        return {"mode": self.mode, "dim": self.dim, "gap_norm": self.gap_norm}


def fit_gap(image_embeddings: Any, text_embeddings: Any, mode: str = "center") -> ModalityGap:
    """Each modality's mean embedding (fitted in float64), stored whatever the mode."""
    images = _as_matrix(image_embeddings, None, "image embeddings")
    texts = _as_matrix(text_embeddings, images.shape[1], "text embeddings")
    if len(images) == 0 or len(texts) == 0:
        raise ValueError("fit_gap needs at least one image and one text embedding")
    return ModalityGap(
        image_mean=images.astype(np.float64).mean(axis=0).astype(np.float32),
        text_mean=texts.astype(np.float64).mean(axis=0).astype(np.float32),
        mode=mode,
    )


def measured_disparity(losses: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per attribute: mean loss of samples with it minus mean loss of samples without it."""
    labels = np.asarray(labels, dtype=bool)
    losses = np.asarray(losses, dtype=np.float64)
    if labels.ndim != 2 or labels.shape[0] != losses.shape[0]:
        raise ValueError(
            f"attribute labels must be [n, A] for the {losses.shape[0]} samples, got {labels.shape}"
        )
    pos = labels.sum(axis=0)
    neg = labels.shape[0] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pos = (losses @ labels) / pos
        mean_neg = (losses @ ~labels) / neg
    return mean_pos - mean_neg


def correlations(estimated: np.ndarray, measured: np.ndarray) -> dict[str, Any]:
    """Pearson, Spearman, Kendall (coefficient, p-value) over attributes with both values finite."""
    # lazy: scipy.stats (+570 modules, 1.3 s), kept off core.query's and the definitions' load
    from scipy import stats

    keep = np.isfinite(estimated) & np.isfinite(measured)
    est, mea = estimated[keep], measured[keep]
    result: dict[str, Any] = {"n_attributes": int(keep.sum())}
    if keep.sum() < 3:
        for name in ("pearson", "spearman", "kendall"):
            result[name] = {"r": float("nan"), "p": float("nan")}
        return result
    for name, test in (
        ("pearson", stats.pearsonr),
        ("spearman", stats.spearmanr),
        ("kendall", stats.kendalltau),
    ):
        res = test(est, mea)
        result[name] = {"r": float(res.statistic), "p": float(res.pvalue)}
    return result


def measure_gap_effect(
    *,
    train_embeddings: np.ndarray,
    train_losses: np.ndarray,
    eval_embeddings: np.ndarray,
    eval_losses: np.ndarray,
    eval_labels: np.ndarray,
    prompts: Sequence[tuple[str, str]],
    encode_texts: Callable[[Sequence[str]], np.ndarray],
    text_corpus_embeddings: np.ndarray,
    config: Any,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train heads with the gap centred and not, and compare how well each recovers disparities.

    `eval_labels` [n_eval, A] are boolean attributes of the evaluation images and `prompts` one
    (with, without) text pair per attribute. For each mode the result holds the held-out Spearman
    of the mean-ensemble on images, and the Pearson/Spearman/Kendall correlation over attributes
    between the estimated disparity (mean over members of standardised h(text_with) -
    h(text_without)) and the measured one (mean eval loss with the attribute minus without).
    """
    # lazy: torch and scipy.stats (3 s), kept off core.query, which imports this module
    from llm2loss_pipeline.core.heads.evaluate import evaluate_ensemble
    from llm2loss_pipeline.core.heads.train import train_ensemble

    if len(prompts) != np.asarray(eval_labels).shape[1]:
        raise ValueError(
            f"{len(prompts)} prompt pairs but {np.asarray(eval_labels).shape[1]} attribute columns"
        )
    measured = measured_disparity(eval_losses, eval_labels)
    texts = [text for pair in prompts for text in pair]
    text_emb = np.asarray(encode_texts(texts), dtype=np.float32)
    result: dict[str, Any] = {"measured_disparity": measured.tolist()}
    for mode in GAP_MODES:
        gap = fit_gap(train_embeddings, text_corpus_embeddings, mode)
        heads_config = config.model_copy(update={"modality_gap": mode})
        ensemble = train_ensemble(
            gap.image(train_embeddings), train_losses, heads_config, device=device
        )
        held_out = evaluate_ensemble(ensemble, gap.image(eval_embeddings), eval_losses)
        scores = ensemble.standardized(gap.text(text_emb))  # [M, 2A]
        estimated = (scores[:, 0::2] - scores[:, 1::2]).mean(axis=0)
        result[mode] = {
            "heldout_ensemble_spearman": held_out["groups"]["overall"]["ensemble_spearman"],
            "estimated_disparity": estimated.tolist(),
            "correlation": correlations(estimated, measured),
            "gap_norm": gap.gap_norm,
        }
    return result
