"""Evaluation metrics: top-1/top-5, loss and confusion counted exactly, the confusion CSV, VOC
average precision (by hand and against VOCdevkit's algorithm), the multi-label loss, and the
softmax averaged over test views."""

import math

import pytest
import torch
from torch import nn

from data.core import Split
from data.loaders import BatchLoader
from data.transforms import Pipeline
from training.figures import write_confusion_csv
from training.loop import evaluate
from training.tasks import MULTI, multilabel_loss, voc_average_precision


class Identity(Pipeline):
    """Pixels as floats, one view: lets a test feed chosen values straight to a model."""

    def train(self, x, generator=None):
        return x.float()

    def evaluate(self, x):
        return x.float().unsqueeze(1)


def index_loader(labels: torch.Tensor, batch_size: int = 3) -> BatchLoader:
    """Images that carry their own row index in every pixel."""
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    return BatchLoader(Split(images, labels), batch_size=batch_size, pipeline=Identity(), train=False)


class LookupModel(nn.Module):
    """Returns fixed logits for each image; images carry their row index in every pixel."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0, 0, 0].round().long()]


def test_evaluate_counts_top1_top5_loss_and_confusion_exactly():
    # 7 classes, 9 images; the rank of the true class in each row is worked out on the right.
    rows = [
        ([9, 1, 2, 3, 4, 5, 6], 0),  # 9 is the largest: rank 1
        ([1, 2, 9, 3, 4, 5, 6], 1),  # 2 is beaten by 9 6 5 4 3: rank 6
        ([1, 2, 3, 9, 8, 7, 6], 2),  # 3 is beaten by 9 8 7 6: rank 5
        ([1, 2, 3, 4, 9, 8, 7], 3),  # 4 is beaten by 9 8 7: rank 4
        ([5, 6, 7, 8, 9, 1, 2], 4),  # rank 1
        ([1, 2, 3, 4, 8, 7, 9], 5),  # 7 is beaten by 9 8: rank 3
        ([1, 2, 9, 3, 4, 5, 6], 3),  # 3 is beaten by 9 6 5 4: rank 5
        ([1, 2, 3, 4, 9, 8, 7], 6),  # 7 is beaten by 9 8: rank 3
        ([9, 8, 7, 6, 5, 4, 3], 6),  # rank 7
    ]
    logits = torch.tensor([r for r, _ in rows], dtype=torch.float32)
    labels = torch.tensor([label for _, label in rows])
    n = len(labels)
    result = evaluate(LookupModel(logits), index_loader(labels), num_classes=7)

    top1 = [0, 4]
    top5 = [0, 2, 3, 4, 5, 6, 7]
    assert result.top1 == pytest.approx(100 * len(top1) / n)
    assert result.top5 == pytest.approx(100 * len(top5) / n)
    expected_loss = sum(-torch.log_softmax(logits[i], 0)[labels[i]].item() for i in range(n)) / n
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    predicted = logits.argmax(1)
    expected = torch.zeros(7, 7, dtype=torch.int64)
    for t, p in zip(labels.tolist(), predicted.tolist(), strict=False):
        expected[t, p] += 1
    assert torch.equal(result.confusion, expected)
    assert result.count == n


def test_evaluate_uses_top_k_of_all_classes_when_fewer_than_five():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    result = evaluate(LookupModel(logits), index_loader(torch.tensor([0, 0])), num_classes=3)
    assert (result.top1, result.top5) == (50.0, 100.0)


def test_confusion_csv_is_labelled(tmp_path):
    path = tmp_path / "c.csv"
    write_confusion_csv(torch.tensor([[3, 1], [0, 4]]), ["cat", "dog"], path)
    assert path.read_text().splitlines() == ["true\\predicted,cat,dog", "cat,3,1", "dog,0,4"]


# ---------------------------------------------------------------------------------------------
# Multi-label (VOC) metrics


def voc_ap_reference(scores: list[float], labels: list[int]) -> float:
    """VOCdevkit's VOCap, written out: precision/recall over the ranked list, a precision
    envelope, and the area summed where recall changes. Labels 0 are dropped first."""
    kept = sorted(((s, y) for s, y in zip(scores, labels, strict=False) if y != 0), key=lambda t: -t[0])
    n_pos = sum(y == 1 for _, y in kept)
    tp = fp = 0
    rec, prec = [], []
    for _, y in kept:
        tp += y == 1
        fp += y == -1
        rec.append(tp / n_pos)
        prec.append(tp / (tp + fp))
    mrec, mpre = [0.0, *rec, 1.0], [0.0, *prec, 0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def test_voc_average_precision_by_hand():
    # Ranked: + - (ignored) + +, so precisions 1, 1/2, 2/3, 3/4 at the positives' ranks 1, 3, 4;
    # the envelope lifts 2/3 to 3/4: AP = (1 + 3/4 + 3/4) / 3.
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([1, -1, 1, 0, 1], dtype=torch.int8)
    assert voc_average_precision(scores, labels) == pytest.approx((1 + 0.75 + 0.75) / 3)
    assert voc_average_precision(torch.tensor([0.9, 0.1]), torch.tensor([-1, 1], dtype=torch.int8)) == 0.5
    assert voc_average_precision(torch.tensor([0.2, 0.1]), torch.tensor([1, 1], dtype=torch.int8)) == 1.0
    assert math.isnan(voc_average_precision(torch.tensor([0.2, 0.1]), torch.tensor([-1, 0], dtype=torch.int8)))


def test_voc_average_precision_matches_the_vocdevkit_algorithm():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(2, 40, (1,), generator=g))
        scores = torch.rand(n, generator=g)
        labels = torch.randint(-1, 2, (n,), generator=g).to(torch.int8)
        labels[0] = 1
        assert voc_average_precision(scores, labels) == pytest.approx(
            voc_ap_reference(scores.tolist(), labels.tolist())
        )


def test_multilabel_loss_ignores_difficult_entries():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([[1, -1, 0], [-1, 1, 0]], dtype=torch.int8)
    counted = [(2.0, 1), (-1.0, 0), (0.0, 0), (3.0, 1)]
    expected = sum(-math.log(torch.sigmoid(torch.tensor(z if t else -z)).item()) for z, t in counted) / 4
    assert multilabel_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    changed = labels.clone()
    logits2 = logits.clone()
    logits2[:, 2] = 100.0  # the ignored column can say anything
    assert multilabel_loss(logits2, changed).item() == pytest.approx(expected, rel=1e-6)


def test_evaluate_multilabel_gives_map_and_hit_rates():
    labels = torch.tensor([[1, -1, -1], [-1, 1, 0], [1, 1, -1], [-1, -1, 1]], dtype=torch.int8)
    logits = torch.tensor([[3.0, 1.0, 0.0], [2.0, 1.0, 5.0], [0.0, 2.0, 1.0], [1.0, 0.0, -1.0]])
    result = evaluate(LookupModel(logits), index_loader(labels, batch_size=3), num_classes=3, multilabel=True)
    probs = torch.sigmoid(logits)
    expected_ap = [100 * voc_ap_reference(probs[:, c].tolist(), labels[:, c].tolist()) for c in range(3)]
    assert result.ap == pytest.approx(expected_ap)
    assert result.mAP == pytest.approx(sum(expected_ap) / 3) and MULTI.score(result) == result.mAP
    # Top class per row: 0 (positive), 2 (difficult: not a hit), 1 (positive), 0 (negative).
    assert result.top1 == 50.0
    assert result.top5 == 100.0  # every image has a positive somewhere among its 3 classes
    # Confusion of multi-label data: (each positive class, top-1 prediction) pairs.
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for true, predicted in [(0, 0), (1, 2), (0, 1), (1, 1), (2, 0)]:
        expected[true, predicted] += 1
    assert torch.equal(result.confusion, expected)


class TwoViews(Identity):
    views = 2

    def evaluate(self, x):
        x = x.float()
        return torch.stack([x, x + 4], dim=1)  # the second view looks up rows 4..7


def test_evaluate_averages_the_softmax_of_the_views():
    logits = torch.tensor(
        [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0], [0.0, 4.0], [3.0, 0.0], [1.0, 0.0], [0.0, 0.0]]
    )
    labels = torch.tensor([0, 1, 0, 1])
    n = 4
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    loader = BatchLoader(Split(images, labels), batch_size=4, pipeline=TwoViews(), train=False)
    result = evaluate(LookupModel(logits), loader, num_classes=2)
    probs = (logits[:4].softmax(1) + logits[4:].softmax(1)) / 2
    assert result.loss == pytest.approx(-probs[torch.arange(4), labels].log().mean().item(), rel=1e-6)
    assert result.top1 == 100.0 * (probs.argmax(1) == labels).float().mean().item()
