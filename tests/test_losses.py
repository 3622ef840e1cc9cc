"""Class weights: resolved as asked, applied by Trainer to the loss, and a warning for skewed labels."""

from __future__ import annotations

import pytest
import torch
from trained import train_tiny

from peftune.data import Labels
from peftune.errors import PeftuneError
from peftune.losses import class_weights, warn_if_skewed, weighted_loss

LABELS = Labels(names=("negative", "neutral", "positive"))


def test_balanced_weights_are_examples_over_classes_times_the_class_count():
    train_labels = [0] * 6 + [1] * 3 + [2] * 1  # 10 examples, 3 classes
    assert class_weights("balanced", LABELS, train_labels) == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert class_weights([1, 2, 0.5], LABELS, train_labels) == [1.0, 2.0, 0.5]
    assert class_weights(None, LABELS, train_labels) is None
    with pytest.raises(PeftuneError, match="neutral has no example there"):
        class_weights("balanced", LABELS, [0, 2, 2])
    with pytest.raises(PeftuneError, match="this task is a regression"):
        class_weights("balanced", Labels(names=None), [])


def test_the_weighted_loss_weighs_each_example_by_its_class():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 1])
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    weights = [1.0, 3.0, 0.5]
    expected = (plain * torch.tensor([1.0, 3.0, 0.5, 3.0])).mean()
    assert weighted_loss(weights)({"logits": logits}, labels).item() == pytest.approx(expected.item())
    assert weighted_loss([1.0, 1.0, 1.0])({"logits": logits}, labels).item() == pytest.approx(plain.mean().item())
    # Over an accumulated batch of 8 examples, this half contributes its sum over 8.
    half = weighted_loss(weights)({"logits": logits}, labels, num_items_in_batch=torch.tensor(8)).item()
    assert half == pytest.approx(expected.item() / 2)


def test_a_run_with_class_weights_is_trained_and_scored_with_the_weighted_loss(tmp_path, tiny_bert, reviews):
    """The eval loss Trainer records goes through the weighted loss: it matches the weighted cross-entropy of the
    saved model's logits, not the plain one (so the test fails if the weights are ignored)."""
    import csv

    from peftune.inference import batched_logits, load_target

    run, _ = train_tiny(tmp_path, tiny_bert, reviews, "train.class_weights=[1.0, 4.0]")
    record = run.read_metrics()
    assert record.class_weights == [1.0, 4.0]
    loaded = load_target(run.path)
    with open(reviews[1], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    logits = torch.from_numpy(batched_logits(loaded, [r["text"] for r in rows]))
    labels = torch.tensor([loaded.labels.encode(r["label"]) for r in rows])
    weighted = weighted_loss([1.0, 4.0])({"logits": logits}, labels).item()
    plain = torch.nn.functional.cross_entropy(logits, labels).item()
    assert abs(weighted - plain) > 1e-2
    assert record.eval["loss"] == pytest.approx(weighted, abs=1e-4)
    # Trainer takes the labels out of the batch for the loss: the metrics still see them.
    assert record.eval["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert "class_weights" in run.recipe_file.read_text()

    (tmp_path / "plain").mkdir()
    unweighted, _ = train_tiny(tmp_path / "plain", tiny_bert, reviews)
    assert unweighted.read_metrics().class_weights is None


def test_skewed_training_labels_get_one_warning_unless_weighted(caplog):
    labels = Labels(names=("no", "yes"))
    skewed = [0] * 90 + [1] * 10
    with caplog.at_level("WARNING", logger="peftune.losses"):
        warn_if_skewed(labels, skewed, weighted=False)
        warn_if_skewed(labels, skewed, weighted=True)
        warn_if_skewed(labels, [0] * 70 + [1] * 30, weighted=False)  # CoLA's split: not badly skewed
    assert caplog.messages == [
        "the training labels are skewed (no 90.0%, yes 10.0%); set train.class_weights=balanced to weigh the rare "
        "classes up, and judge the run by macro F1 rather than accuracy"
    ]
