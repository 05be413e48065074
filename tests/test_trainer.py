"""Metrics, checkpoints and run bookkeeping of the trainer."""

import math

import pytest
import torch
from torch import nn

from datasets import BatchLoader, BatchTransform, Split
from trainer import evaluate, unwrap, write_confusion_csv
from utils import atomic_torch_save, atomic_write_json, unique_run_name


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
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    transform = BatchTransform(torch.zeros(3), torch.full((3,), 1 / 255), input_size=2, crop_padding=0)
    loader = BatchLoader(Split(images, labels), batch_size=3, transform=transform, train=False)

    result = evaluate(LookupModel(logits), loader, num_classes=7)

    top1 = [0, 4]
    top5 = [0, 2, 3, 4, 5, 6, 7]
    assert result.top1 == pytest.approx(100 * len(top1) / n)
    assert result.top5 == pytest.approx(100 * len(top5) / n)
    expected_loss = sum(-torch.log_softmax(logits[i], 0)[labels[i]].item() for i in range(n)) / n
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    predicted = logits.argmax(1)
    expected = torch.zeros(7, 7, dtype=torch.int64)
    for t, p in zip(labels.tolist(), predicted.tolist()):
        expected[t, p] += 1
    assert torch.equal(result.confusion, expected)
    assert result.count == n


def test_evaluate_uses_top_k_of_all_classes_when_fewer_than_five():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    images = torch.arange(2, dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous()
    transform = BatchTransform(torch.zeros(3), torch.full((3,), 1 / 255), input_size=2, crop_padding=0)
    loader = BatchLoader(Split(images, torch.tensor([0, 0])), batch_size=2, transform=transform, train=False)
    result = evaluate(LookupModel(logits), loader, num_classes=3)
    assert (result.top1, result.top5) == (50.0, 100.0)


def test_confusion_csv_is_labelled(tmp_path):
    path = tmp_path / "c.csv"
    write_confusion_csv(torch.tensor([[3, 1], [0, 4]]), ["cat", "dog"], path)
    assert path.read_text().splitlines() == ["true\\predicted,cat,dog", "cat,3,1", "dog,0,4"]


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    atomic_torch_save({"model": {"w": torch.ones(2)}, "epoch": 1}, path)
    atomic_torch_save({"model": {"w": torch.zeros(2)}, "epoch": 2}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.zeros(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]

    class Boom(Exception):
        pass

    class Unsaveable:
        def __reduce__(self):
            raise Boom

    with pytest.raises(Boom):
        atomic_torch_save({"x": Unsaveable()}, path)
    assert torch.load(path, weights_only=True)["epoch"] == 2  # the old file survived
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]

    atomic_write_json({"b": 1, "a": math.pi}, tmp_path / "s.json")
    assert (tmp_path / "s.json").read_text().startswith('{\n  "a": 3.14159')


def test_unique_run_name_never_reuses_a_folder(tmp_path):
    first = unique_run_name("Net_modern", tmp_path)
    (tmp_path / first).mkdir()
    second = unique_run_name("Net_modern", tmp_path)
    assert second != first
    (tmp_path / second).mkdir()
    assert unique_run_name("Net_modern", tmp_path) not in (first, second)


def test_unwrap_strips_compile_and_ddp_wrappers():
    model = nn.Linear(2, 2)

    class FakeDDP(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(FakeDDP(model)) is model
    compiled = torch.compile(model)
    assert unwrap(compiled) is model
    assert list(unwrap(compiled).state_dict()) == ["weight", "bias"]
