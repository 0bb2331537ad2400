"""Teaching the default encoder's image tower the attribute language.

Contrastive (CLIP InfoNCE, symmetric, learnable logit scale) training of the image tower only, on
(image, caption) pairs of the training split. The text tower is frozen, so every caption is
embedded once: a pool of `captions_per_image` captions per image (`captions.py`), from which each
step draws, per image, one caption that is true of it (its own, or with `share_captions` any
caption whose stated values all hold for it).

Many images share what a caption says ("face of a smiling woman"); one-hot InfoNCE (`clip`) pushes
each image away from such captions of its batch peers. The remedies, all from the exact truth
table of the attribute values each caption states:
- `pool` (default): multi-positive InfoNCE of each image against the caption pool, the target
  spread evenly over the captions true of it, plus captions-to-images within the batch. Every
  step then contrasts each image with thousands of captions, among them near-copies of its own
  that differ in one attribute ("... wearing a hat" against "... without a hat"). The pool grows
  with the data (2 captions per training image), so a step scores against at most `pool_size`
  captions besides the batch's own, taken from a seeded queue over the pool (`NegativeQueue`);
  a pool that fits (the default world's 4,320 captions under 8,192) is scored whole, as before.
  Without the bound, an epoch is O(images x captions): one step's loss costs 0.02 s at 4,320
  captions, 0.07 s at 16,384 and 0.68 s at 65,536 (one thread), against 0.67 s for the image
  tower's forward and backward pass of 128 images, so 16 times the default world's images would
  double the time per image and CelebA's size would multiply it by six. The sample keeps the
  quality, measured through the pipeline (`bench/encoder_quality.py --pipeline`: 60 identities x
  20 images, 605 training images, 1,210 captions; pool_size 160 scores 264 columns per step,
  the share of the pool that 8,192 is of a world 16 times the default's):

      world  encoder seed  pool          zero-shot AUROC  report Spearman  planted ranks
      0      0             whole (1,210)  0.708            0.667            1 / 2
      0      0             160            0.707            0.564            2 / 1
      0      1             whole          0.686            0.808            1 / 2
      0      1             160            0.689            0.775            1 / 2
      1      0             whole (1,220)  0.665            0.487            6 / 1
      1      0             160            0.658            0.484            8 / 1

  Means over the three: zero-shot 0.686 whole, 0.685 sampled; Spearman 0.654 whole, 0.608
  sampled. The Spearman moves by 0.14 between two encoder seeds with the whole pool, so the
  sample's differences are within the seed noise;
- `consistent`: the same, within the batch only;
- `soft`: targets from the softmax of caption-caption similarity in the sentence model
  (temperature `soft_target_temperature`). The sentence model puts "wearing glasses" and
  "without glasses" close together, so these targets blur exactly the distinctions we want.

Measured on the generated world (120 identities x 30 images, 64 px; 2,160 training images, 720
validation images; 10 epochs, batch 128, one torch thread on a shared 2-core machine), mean
zero-shot AUROC over the 39 rendered attributes on the validation split, and image-to-caption
top-1 in galleries of 100 (chance 0.011):

    loss        mean AUROC   top-1
    clip        0.645        0.054
    soft        0.646        0.054
    consistent  0.652        0.042
    pool        0.694        0.049-0.056

Identity-level attributes are learned first (Male 0.985, Young 0.98, Black_Hair 0.96, Gray_Hair
0.93, Blond_Hair 0.88 after 10 epochs); image-level details come slowly (Eyeglasses 0.60,
Wearing_Hat 0.50, Smiling 0.48), and a linear probe on the embeddings shows the image tower has
not yet picked them up. They keep improving with more epochs (20 epochs: mean 0.77, Eyeglasses
0.64, Bald 0.74). Rejected after measuring: a SigLIP-style sigmoid loss over the pool (0.58),
adding shared single-attribute captions to the pool (no gain), a ViT tower (slower per epoch).

The attribute loss (`attribute_loss_weight`, default 3; `attribute_directions`, default dual):
captions state ~5 of an image's 40 values, and only in contrast with other captions; every
image's 40 labels are known, so a direct per-attribute signal is added. Per attribute, a frozen
text direction (mean of text(positive) - text(negative) over its phrase pairs, written in three
*training-caption* templates, never the report's probe templates, so the report's probes still
test generalisation to unseen wording) and a class-balanced BCE of
`scale_a * <image, direction_a> + bias_a` against the label (`attribute_loss`; scale and bias are
training-only, not saved).

Which direction the logit reads matters for the report more than for the zero-shot AUROC. The
sentence model's attribute directions share a large "with X" - "without X" component
(Eyeglasses vs Goatee cosine 0.85, vs Wearing_Hat 0.82; mean over pairs 0.21). Trained on the
raw (`text`) directions, images with a goatee move along that shared component; the diagnosis
heads then learn "loss is high along it", and every attribute with alike wording inherits the
planted disparity (Wearing_Hat ranked 1st, measured gap 0.02). The `dual` directions (rows of
G^-1 D for the Gram matrix G of the unit directions D, renormalised) are each orthogonal to the
other attributes' text directions: meeting their targets places an image at about sum_a y_a d_a,
so a linear head fit to one attribute's loss reads back (nearly) only that attribute from the
report's text. Measured with `bench/encoder_quality.py` (same world, 10 epochs, one torch thread;
train s: the epochs alone, under load 2-4, so +-10 s; the directions add ~2 s of text embedding):

    variant                             mean   Eyegl.  Hat    Smiling  Mouth  Bald   train s
    pool only (weight 0)                0.651  0.575   0.519  0.531    0.512  0.395  90-160
    text, weight 1, unbalanced          0.719  0.622   0.566  0.532    0.551  0.574  160 (load 4)
    text, weight 3, unbalanced          0.773  0.632   0.605  0.543    0.581  0.656  94
    text, weight 3, balanced            0.801  0.613   0.747  0.542    0.570  0.877  95
    text, weight 10, balanced           0.808  0.623   0.793  0.527    0.591  0.861  90
    text, weight 3, 1 caption/image,
      12 epochs                         0.821  0.622   0.774  0.550    0.614  0.862  112
    text, weight 1, lr 4e-3, unbal.     0.648  0.542   0.544  0.524    0.523  0.423  93

and through the whole pipeline (`llm2loss run`, default world; zero-shot on the validation
split; Spearman of estimated vs measured signed disparity over the 40 attributes; ranks of the
planted Gray_Hair / Goatee by estimated disparity):

    encoder                        zero-shot  Spearman  planted ranks  top-1 retrieval
    pool only                      0.650      0.194     4 / 2          0.044
    text directions, weight 3      0.805      0.119     5 / 3          0.072
    dual directions, weight 3      0.787      0.429     4 / 3          0.090
    dual directions, weight 10     0.785      0.345     11 / 4         0.065
Eyeglasses and Smiling stay near 0.6 / 0.5: small details at 64 px that the 24-wide ResNet does
not resolve within 10 epochs.

More epochs, bought with bf16 (stop 27; `devices.encoder.precision: auto` autocasts the tower to
bf16 where the CPU or GPU multiplies it natively, and the weights stay fp32). On tuning world 1001
(`bench/encoder_quality.py --variants dual3,dual3_bf16,dual3_bf16_e20,dual3_bf16_e30`, 2-core
AMD EPYC with AVX512-BF16, one thread):

    variant              mean   Eyegl.  Hat    Smiling  Mouth  train s
    fp32, 10 epochs      0.837  0.576   0.802  0.539    0.553  90 (loaded)
    bf16, 10 epochs      0.837  0.566   0.797  0.538    0.558  60 (loaded)
    bf16, 20 epochs      0.883  0.580   0.912  0.622    0.646  119 (loaded)
    bf16, 30 epochs      0.905  0.597   0.917  0.773    0.784  102 (quieter)

Through the pipeline on the eight tuning worlds the mean zero-shot AUROC went 0.78 (10 epochs)
-> 0.84 (20) -> 0.86 (30), with every claim right at 20 and two of 14 wrong at 30, so the default
is 20 epochs (bench/RESULTS.md, "Stop 27"). Without native bf16 the 20 epochs run in fp32 and
take twice the 10 epochs' time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llm2loss_pipeline.core.choices import ON_BAD_IMAGE, one_of
from llm2loss_pipeline.core.device import DeviceSpec, deterministic
from llm2loss_pipeline.core.encoder.captions import (
    build_caption_pool,
    captions_for_rows,
    embed_pool,
)
from llm2loss_pipeline.core.encoder.config import EncoderConfig
from llm2loss_pipeline.core.encoder.embed import embed_images, image_batches
from llm2loss_pipeline.core.encoder.evaluate import retrieval_accuracy, zero_shot_auroc
from llm2loss_pipeline.core.encoder.factory import Encoder
from llm2loss_pipeline.core.images import UnreadableImagesError, describe_bad_images
from llm2loss_pipeline.core.prompts import CAPTION_TEMPLATES, _realise, phrases

Items = Sequence[tuple[str, str | Path]]
Progress = Callable[[str, int, int], None]
Validation = tuple[Items, Sequence[Mapping[str, bool]]]


def load_image_tensors(
    encoder: Encoder,
    items: Items,
    device_spec: DeviceSpec,
    progress: Progress | None = None,
    on_bad_image: str = "fail",
) -> tuple[torch.Tensor, list[int]]:
    """The decodable images of `items`, preprocessed once and kept as float16 [n, 3, H, W] on the
    CPU (3,600 images of 64 px take 88 MB), so epochs do not decode files again; with the
    positions in `items` that could not be decoded (skip mode), in order.

    In fail mode one error lists every unreadable image, not only the first.
    """
    one_of("on_bad_image", on_bad_image, ON_BAD_IMAGE)
    out: torch.Tensor | None = None
    done = torch.zeros(len(items), dtype=torch.bool)
    skipped: list[int] = []
    seen = 0
    for positions, images, bad in image_batches(encoder, items, device_spec, on_bad_image="skip"):
        skipped.extend(int(p) for p in bad)
        if len(positions):
            if out is None:
                out = torch.empty((len(items), *images.shape[1:]), dtype=torch.float16)
            out[positions] = images.to(torch.float16)
            done[positions] = True
        seen += len(positions) + len(bad)
        if progress is not None:
            progress("load images", seen, len(items))
    skipped.sort()
    if skipped and on_bad_image == "fail":
        raise UnreadableImagesError(
            "encoder training",
            describe_bad_images(items, skipped),
            "no encoder was trained or saved",
        )
    if out is None:
        raise ValueError("no training images: the caption-tuned encoder needs at least one")
    return (out if not skipped else out[done]), skipped


def augment(images: torch.Tensor, generator: torch.Generator, shift: int) -> torch.Tensor:
    """Random horizontal flips and shifts of up to `shift` pixels (reflect-padded)."""
    n, _, height, width = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if shift <= 0:
        return images
    padded = F.pad(images, (shift, shift, shift, shift), mode="reflect")
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width)[None, :])[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channels, rows, cols]


def truth_table(
    rows: torch.Tensor, known: torch.Tensor, stated: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """[images, captions] float 1.0 where every value the caption states holds for the image."""
    rows, stated = rows.float(), stated.float()
    stated_true = stated * values.float()
    mismatches = (
        rows @ stated.T
        + stated_true.sum(dim=1)[None, :]
        - 2.0 * rows @ stated_true.T
        + (1.0 - known.float()) @ stated.T
    )
    return (mismatches < 0.5).float()


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    loss: str,
    soft_temperature: float,
    truth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between normalised image and caption features of one batch.

    `truth[i, j]` (for `consistent`) is 1 where caption j is true of image i; the diagonal is 1.
    """
    logits = logit_scale.exp() * image_features @ text_features.T
    if loss == "clip":
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    with torch.no_grad():
        if loss == "consistent":
            if truth is None:
                raise ValueError("the consistent loss needs the batch's truth table")
            image_target = truth / truth.sum(dim=1, keepdim=True)
            text_target = truth.T / truth.T.sum(dim=1, keepdim=True)
        else:
            similarity = text_features @ text_features.T
            image_target = text_target = torch.softmax(similarity / soft_temperature, dim=1)
    image_to_text = -(image_target * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_to_image = -(text_target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def pool_loss(
    image_features: torch.Tensor,
    pool_features: torch.Tensor,
    logit_scale: torch.Tensor,
    truth: torch.Tensor,
    captions: torch.Tensor,
) -> torch.Tensor:
    """Multi-positive InfoNCE of each image against the whole caption pool (`truth[i, j]` = 1
    where pool caption j is true of image i), plus captions-to-images within the batch
    (`captions[i]` = the pool index of the caption drawn for image i)."""
    logits = logit_scale.exp() * image_features @ pool_features.T
    with torch.no_grad():
        image_target = truth / truth.sum(dim=1, keepdim=True)
        batch_truth = truth[:, captions].T  # [caption of image j, image i]
        text_target = batch_truth / batch_truth.sum(dim=1, keepdim=True)
    image_to_text = -(image_target * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_to_image = -(text_target * F.log_softmax(logits[:, captions].T, dim=1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


class NegativeQueue:
    """Pool captions to contrast with, `size` per step, from a seeded queue over the whole pool.

    The queue is a random permutation of the pool, consumed in order and drawn again when it runs
    out, so every caption serves as a negative equally often and a step costs O(`size`) whatever
    the pool's size (the permutation, O(pool), is paid once per pass over the pool). A pool no
    larger than `size` is used whole every step, exactly as before the queue existed, and then
    nothing is drawn from the generator.
    """

    def __init__(self, n_pool: int, size: int, generator: torch.Generator) -> None:
        self.n_pool, self.size, self.generator = n_pool, size, generator
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    @property
    def whole(self) -> bool:
        return self.n_pool <= self.size

    def take(self) -> torch.Tensor:
        """The next `size` pool indices (distinct unless a pass ends inside the step)."""
        parts: list[torch.Tensor] = []
        wanted = self.size
        while wanted:
            if self.position == len(self.order):
                self.order = torch.randperm(self.n_pool, generator=self.generator)
                self.position = 0
            part = self.order[self.position : self.position + wanted]
            self.position += len(part)
            wanted -= len(part)
            parts.append(part)
        return torch.cat(parts)


def step_columns(
    queue: NegativeQueue, captions: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(pool indices the step scores against, position of each image's caption among them).

    None for the whole pool (then the positions are the pool indices themselves); otherwise the
    batch's own captions and `queue.size` queued ones, without repeats, so at most
    batch + `pool_size` columns whatever the pool's size."""
    if queue.whole:
        return None, captions
    columns, inverse = torch.unique(torch.cat([captions, queue.take()]), return_inverse=True)
    return columns, inverse[: len(captions)]


ATTRIBUTE_TEMPLATES: tuple[str, ...] = CAPTION_TEMPLATES[:3]
"""Caption templates the attribute directions are written in. Training-caption templates only
(disjoint from the report's `prompts.TEMPLATES`), so the report's probes still test whether the
language generalises beyond the wording trained on; three keep the extra texts to embed few."""


BALANCED = True
"""Class-balance the attribute loss (see `attribute_loss`)."""


def attribute_directions(
    encode_texts: Callable[[Sequence[str]], np.ndarray],
    attributes: Sequence[str],
    templates: Sequence[str] = ATTRIBUTE_TEMPLATES,
    kind: str = "text",
) -> np.ndarray:
    """[len(attributes), d] unit text directions, one per attribute: the mean over its caption
    phrase pairs (i-th positive with i-th negative phrase, as in
    `prompts.attribute_prompt_pairs`) and `templates` of text(positive) - text(negative)."""
    positives: list[str] = []
    negatives: list[str] = []
    counts: list[int] = []
    for attribute in attributes:
        yes, no = phrases(attribute, True), phrases(attribute, False)
        n_pairs = max(len(yes), len(no))
        for index in range(n_pairs):
            positive = _realise([(attribute, yes[index % len(yes)])])
            negative = _realise([(attribute, no[index % len(no)])])
            for template in templates:
                positives.append(template.format(positive))
                negatives.append(template.format(negative))
        counts.append(n_pairs * len(templates))
    embedded = np.asarray(encode_texts(positives + negatives), dtype=np.float64)
    differences = embedded[: len(positives)] - embedded[len(positives) :]
    directions = np.stack(
        [part.mean(axis=0) for part in np.split(differences, np.cumsum(counts)[:-1])]
    )
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    if kind == "dual":
        # rows of G^-1 D: <dual_a, text direction_b> = 0 for b != a, so an image embedding that
        # meets these targets lies along the text directions themselves, and a linear head fit
        # to one attribute's loss does not leak into attributes whose wording is merely alike
        directions = np.linalg.solve(directions @ directions.T, directions)
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions.astype(np.float32)


def attribute_loss(
    image_features: torch.Tensor,
    directions: torch.Tensor,
    log_scale: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    known: torch.Tensor,
    prevalence: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the known labels of the BCE of `exp(log_scale_a) * <image, direction_a> + bias_a`
    against the image's value of attribute a. The scale is positive, so an image can only meet
    its label by moving along the text's own sense of the attribute, never against it.

    With `prevalence` [attributes] the labels are class-balanced (positives weighted 0.5 / p,
    negatives 0.5 / (1 - p)): rare attributes (hats 7%) otherwise add almost nothing."""
    logits = log_scale.exp() * (image_features @ directions.T) + bias
    losses = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
    weights = known.float()
    if prevalence is not None:
        weights = weights * torch.where(labels, 0.5 / prevalence, 0.5 / (1.0 - prevalence))
    return (losses * weights).sum() / weights.sum().clamp_min(1.0)


def _lr_at(step: int, total: int, config: EncoderConfig) -> float:
    warmup = max(1, round(config.warmup_fraction * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# long: being restructured by the encoder-training work (issue 20 item 2 leaves it to them)
def train_caption_tuned(
    encoder: Encoder,
    items: Items,
    attribute_rows: Sequence[Mapping[str, bool]],
    config: EncoderConfig,
    device_spec: DeviceSpec,
    progress: Progress | None = None,
    validation: Validation | None = None,
    on_bad_image: str = "fail",
) -> dict[str, Any]:
    """Train the image tower of a caption-tuned encoder in place; return training metrics.

    `items` are the training split's (sample_id, path) pairs and `attribute_rows[i]` the attribute
    values of `items[i]`. With `validation` (items, rows) the zero-shot attribute AUROC and caption
    retrieval are measured after every epoch (for tuning; it costs an embedding pass each).
    Deterministic for `config.seed` on the CPU. Unreadable images fail the training, listed all
    at once, or with `on_bad_image="skip"` are left out and recorded in the metrics
    (`skipped_images`: [sample_id, reason] pairs, and their count `n_skipped_images`).
    """
    if config.mode != "caption_tuned" or encoder.config.mode != "caption_tuned":
        raise ValueError("train_caption_tuned trains caption_tuned encoders only")
    if len(items) != len(attribute_rows):
        raise ValueError(
            f"{len(items)} training images but {len(attribute_rows)} attribute rows; "
            "they must pair up"
        )
    if len(items) < 2:
        raise ValueError("contrastive training needs at least 2 training images")
    started = time.perf_counter()
    device = device_spec.torch_device()
    encoder.to(device)
    model = encoder.model

    # captions first: a bad attribute row fails before minutes of image decoding
    pool = build_caption_pool(attribute_rows, config.captions_per_image, config.seed)
    images, skipped = load_image_tensors(encoder, items, device_spec, progress, on_bad_image)
    skipped_images = []
    if skipped:
        skipped_images = [[sid, why] for sid, _, why in describe_bad_images(items, skipped)]
        gone = set(skipped)
        items = [item for position, item in enumerate(items) if position not in gone]
        attribute_rows = [
            row for position, row in enumerate(attribute_rows) if position not in gone
        ]
        if len(items) < 2:
            raise ValueError(
                f"contrastive training needs at least 2 training images; {len(items)} left after "
                f"skipping {len(skipped)} unreadable one(s)"
            )
        # the pool is indexed by image, so it is drawn again for the images that remain
        pool = build_caption_pool(attribute_rows, config.captions_per_image, config.seed)
    loaded = time.perf_counter()

    if progress is not None:
        progress("embed captions", 0, pool.n_unique_texts)
    pool = embed_pool(pool, encoder.encode_texts)
    use_attributes = config.attribute_loss_weight > 0
    if use_attributes:
        directions = torch.from_numpy(
            attribute_directions(
                encoder.encode_texts, pool.attributes, kind=config.attribute_directions
            )
        ).to(device)
    if progress is not None:
        progress("embed captions", pool.n_unique_texts, pool.n_unique_texts)
    captioned = time.perf_counter()
    caption_embeddings = torch.from_numpy(pool.embeddings).to(device)
    true_of = torch.from_numpy(pool.true_of)
    n_choices = torch.from_numpy(
        pool.n_true if config.share_captions else np.full(len(items), config.captions_per_image)
    )
    rows, known = torch.from_numpy(pool.rows), torch.from_numpy(pool.known)
    stated, values = torch.from_numpy(pool.stated), torch.from_numpy(pool.values)

    batch_size = min(config.batch_size, len(items))
    steps_per_epoch = len(items) // batch_size  # drop the ragged last batch: InfoNCE needs peers
    total_steps = steps_per_epoch * config.epochs
    shift = max(1, round(4 * config.image_size / 64)) if config.augment else 0
    parameters = [p for p in model.visual.parameters() if p.requires_grad] + [model.logit_scale]
    if getattr(model, "logit_bias", None) is not None:
        parameters.append(model.logit_bias)
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    if use_attributes:
        # training-only calibration of the attribute logits (not saved): a positive scale per
        # attribute, and a bias starting at the label's log-odds so that early steps move the
        # embeddings, not the biases
        labelled = known.float()
        prevalence = ((rows.float() * labelled).sum(0) + 1.0) / (labelled.sum(0) + 2.0)
        balance = prevalence.clamp(0.05, 0.95).to(device) if BALANCED else None
        attribute_bias = torch.log(prevalence / (1.0 - prevalence)).to(device).requires_grad_()
        attribute_log_scale = torch.full(
            (len(pool.attributes),), math.log(10.0), device=device, requires_grad=True
        )
        no_decay += [attribute_log_scale, attribute_bias]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    max_scale = math.log(config.max_logit_scale)
    generator = torch.Generator().manual_seed(config.seed)
    negatives = NegativeQueue(len(caption_embeddings), config.pool_size, generator)

    loss_curve: list[float] = []
    attribute_curve: list[float] = []
    validation_curve: list[dict[str, Any]] = []
    step = max_columns = 0
    with deterministic(config.seed):
        for epoch in range(config.epochs):
            model.visual.train()
            order = torch.randperm(len(items), generator=generator)
            # one caption per image, uniformly among those true of it
            pick = (torch.rand(len(items), generator=generator) * n_choices).long()
            caption_of_image = true_of[torch.arange(len(items)), pick]
            epoch_loss = epoch_attribute = 0.0
            for batch_index in range(steps_per_epoch):
                index = order[batch_index * batch_size : (batch_index + 1) * batch_size]
                x = images[index].float()
                if config.augment:
                    x = augment(x, generator, shift)
                captions = caption_of_image[index]
                text = caption_embeddings[captions]
                truth = None
                if config.loss == "consistent":
                    truth = truth_table(
                        rows[index], known[index], stated[captions], values[captions]
                    ).to(device)
                elif config.loss == "pool":
                    columns, positions = step_columns(negatives, captions)
                    scored = slice(None) if columns is None else columns
                    truth = truth_table(
                        rows[index], known[index], stated[scored], values[scored]
                    ).to(device)
                # captions each image is scored against: what bounds a step's cost
                max_columns = max(max_columns, len(index) if truth is None else truth.shape[1])
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, total_steps, config)
                x = x.to(device, non_blocking=True)
                if device.type == "cpu":  # oneDNN convolutions: about 20% faster channels-last
                    x = x.contiguous(memory_format=torch.channels_last)
                with device_spec.autocast(device):
                    features = model.visual(x)
                features = F.normalize(features.float(), dim=-1)
                if config.loss == "pool":
                    loss = pool_loss(
                        features,
                        caption_embeddings[scored],
                        model.logit_scale,
                        truth,
                        positions.to(device),
                    )
                else:
                    loss = contrastive_loss(
                        features,
                        text,
                        model.logit_scale,
                        config.loss,
                        config.soft_target_temperature,
                        truth,
                    )
                if use_attributes:
                    extra = attribute_loss(
                        features,
                        directions,
                        attribute_log_scale,
                        attribute_bias,
                        rows[index].to(device),
                        known[index].to(device),
                        balance,
                    )
                    epoch_attribute += extra.item()
                    loss = loss + config.attribute_loss_weight * extra
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0.0, max_scale)
                epoch_loss += loss.item()
                step += 1
            loss_curve.append(epoch_loss / max(1, steps_per_epoch))
            if use_attributes:
                attribute_curve.append(epoch_attribute / max(1, steps_per_epoch))
            model.eval()
            if validation is not None:
                validation_curve.append(
                    {"epoch": epoch + 1, **_validate(encoder, validation, device_spec)}
                )
            if progress is not None:
                progress("train epochs", epoch + 1, config.epochs)
    model.eval()
    finished = time.perf_counter()
    metrics: dict[str, Any] = {
        "epochs": config.epochs,
        "steps": step,
        "batch_size": batch_size,
        "n_images": len(items),
        "n_skipped_images": len(skipped_images),
        "skipped_images": skipped_images,
        "n_captions": len(pool.texts),
        "n_unique_captions": pool.n_unique_texts,
        "max_columns_per_step": max_columns,
        "mean_true_captions_per_image": round(float(pool.n_true.mean()), 2),
        "loss": config.loss,
        "precision": device_spec.resolved_precision(device),
        "loss_curve": [round(value, 6) for value in loss_curve],
        "logit_scale": round(float(model.logit_scale.detach().exp()), 4),
        "seconds_load_images": round(loaded - started, 3),
        "seconds_embed_captions": round(captioned - loaded, 3),
        "seconds_train": round(finished - captioned, 3),
        "seconds": round(finished - started, 3),
    }
    if attribute_curve:
        metrics["attribute_loss_weight"] = config.attribute_loss_weight
        metrics["attribute_loss_curve"] = [round(value, 6) for value in attribute_curve]
    if validation_curve:
        metrics["validation_curve"] = validation_curve
    encoder.metrics["training"] = metrics
    return metrics


def _validate(encoder: Encoder, validation: Validation, device_spec: DeviceSpec) -> dict[str, Any]:
    items, rows = validation
    result = embed_images(encoder, items, device_spec)
    matrix = {name: np.array([bool(row[name]) for row in rows]) for name in rows[0]}
    aurocs = zero_shot_auroc(result.embeddings, matrix, encoder.encode_texts)
    finite = [value for value in aurocs.values() if not math.isnan(value)]
    retrieval = retrieval_accuracy(
        result.embeddings, captions_for_rows(rows, seed=1), encoder.encode_texts
    )
    return {
        "mean_zero_shot_auroc": round(float(np.mean(finite)), 4) if finite else float("nan"),
        "zero_shot_auroc": {name: round(value, 4) for name, value in aurocs.items()},
        **retrieval,
    }
