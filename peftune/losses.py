"""Class weights: what `train.class_weights` asks for, the weighted loss Trainer computes with them, and a
warning when the training labels are skewed and nothing weights them.

Single-label: `balanced` is scikit-learn's rule (n_examples / (n_classes * n_examples_of_the_class)). The
weighted loss multiplies each example's cross-entropy by its class's weight and averages over the examples, as
Keras' `class_weight` does, so that `balanced` weights keep the loss on the scale of the unweighted one.

Multi-label: a label's weight multiplies the loss of its positive examples (`pos_weight` of torch's
`BCEWithLogitsLoss`); `balanced` is negatives over positives for each label, the usual choice for rare labels.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from peftune.data import Labels
from peftune.errors import PeftuneError

log = logging.getLogger(__name__)

# Training labels are badly skewed when the rarest class has fewer than one example for this many of the most
# common one's (CoLA's 30/70 and MRPC's 32/68 are not; 1 in 10 is).
SKEW = 5


def class_weights(setting: Any, labels: Labels, train_labels: Sequence[int]) -> list[float] | None:
    """The weight of each class, in label order, for `train.class_weights` (None: no weighting)."""
    if setting is None:
        return None
    if labels.names is None:
        raise PeftuneError("train.class_weights weighs classes, and this task is a regression; remove the key")
    if setting == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        if labels.multi_label:
            hot = np.asarray(train_labels, dtype=np.float64).reshape(-1, labels.num_labels)
            positives = hot.sum(axis=0)
            absent = [labels.names[i] for i in np.flatnonzero(positives == 0)]
            if absent:
                raise PeftuneError(
                    f"train.class_weights=balanced needs every label in the training split, and "
                    f"{', '.join(absent)} has no example there; give the weights as a list, one per label"
                )
            return [round(float(w), 6) for w in (len(hot) - positives) / positives]
        missing = [labels.names[i] for i in range(labels.num_labels) if i not in set(train_labels)]
        if missing:
            raise PeftuneError(
                f"train.class_weights=balanced needs every label in the training split, and {', '.join(missing)} "
                "has no example there; give the weights as a list, one per label"
            )
        weights = compute_class_weight("balanced", classes=np.arange(labels.num_labels), y=np.asarray(train_labels))
        return [round(float(w), 6) for w in weights]
    if len(setting) != labels.num_labels:
        raise PeftuneError(
            f"train.class_weights has {len(setting)} weights but the data has {labels.num_labels} labels "
            f"({', '.join(labels.names)}); give one per label in that order, or balanced"
        )
    return [float(w) for w in setting]


def weighted_loss(weights: Sequence[float], multi_label: bool = False) -> Callable[..., Any]:
    """A `compute_loss_func` for Trainer: cross-entropy, each example's weighted by its class, averaged over the
    examples (over the whole accumulated batch when Trainer gives that count, as its own loss does); multi-label,
    binary cross-entropy with each label's positives weighted, averaged over every label of every example."""

    def loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        import torch
        from torch.nn import functional

        logits = outputs["logits"].float()
        weight = torch.tensor(weights, dtype=logits.dtype, device=logits.device)
        if multi_label:
            per_label = functional.binary_cross_entropy_with_logits(
                logits, labels.to(logits.dtype), pos_weight=weight, reduction="none"
            )
            count = num_items_in_batch if num_items_in_batch is not None else per_label.numel()
            return per_label.sum() / count
        per_example = functional.cross_entropy(
            logits.view(-1, len(weights)), labels.view(-1), weight=weight, reduction="none"
        )
        count = num_items_in_batch if num_items_in_batch is not None else per_example.numel()
        return per_example.sum() / count

    return loss


def warn_if_skewed(labels: Labels, train_labels: Sequence[int], weighted: bool) -> None:
    """One warning line when the training labels are badly skewed and no class weights are set."""
    if weighted or labels.names is None or not train_labels:
        return
    if labels.multi_label:  # how many examples have each label
        counts = Counter({i: int(n) for i, n in enumerate(np.asarray(train_labels).sum(axis=0))})
    else:
        counts = Counter(train_labels)
    rarest = min(range(labels.num_labels), key=lambda i: counts.get(i, 0))
    commonest = max(range(labels.num_labels), key=lambda i: counts.get(i, 0))
    if counts.get(rarest, 0) * SKEW > counts[commonest]:
        return
    total = len(train_labels)
    shares = ", ".join(f"{labels.names[i]} {100 * counts.get(i, 0) / total:.1f}%" for i in range(labels.num_labels))
    log.warning(
        "the training labels are skewed (%s); set train.class_weights=balanced to weigh the rare classes up, and "
        "judge the run by macro F1 rather than accuracy",
        shares,
    )
