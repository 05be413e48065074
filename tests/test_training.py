"""The trainer in process: the paper's update rule, plateau decay, warm start and stopping (on
scripted curves, alone and inside a Trainer), the confusion figure, run names, unwrapping
compiled and DDP models.

Checkpoints, resume and --evaluate are in test_checkpoints.py; the TensorBoard record of a real
run in test_cli.py."""

import re

import pytest
import torch
from torch import nn

import trainer as trainer_module
from data.core import DataOptions
from data.registry import load_dataset
from network import CifarAlexNet
from trainer import Trainer
from training.config import TrainConfig
from training.fastpath import unwrap
from training.figures import confusion_figure
from training.optim import PaperSGD
from training.outputs import new_run_name, taken
from training.schedule import PlateauSchedule
from training.tasks import EvalResult

# ---------------------------------------------------------------------------------------------
# The paper's update rule


def test_paper_sgd_follows_the_papers_formula_across_a_learning_rate_drop():
    torch.manual_seed(0)
    w0 = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(6)]
    lrs = [0.01, 0.01, 0.01, 0.001, 0.001, 0.001]  # a drop after three steps

    param = torch.nn.Parameter(w0.clone())
    optimizer = PaperSGD([param], lr=0.01, momentum=0.9, weight_decay=5e-4)
    w, v = w0.clone(), torch.zeros(5, dtype=torch.float64)
    for g, lr in zip(grads, lrs, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr
        param.grad = g.clone()
        optimizer.step()
        v = 0.9 * v - 0.0005 * lr * w - lr * g  # v <- 0.9 v - 0.0005 e w - e dL/dw
        w = w + v  # w <- w + v
        assert torch.allclose(param.detach(), w, rtol=0, atol=1e-15)


def test_pytorch_sgd_agrees_while_the_rate_is_constant_and_differs_after_a_drop():
    torch.manual_seed(1)
    w0 = torch.randn(4, dtype=torch.float64)
    grads = [torch.randn(4, dtype=torch.float64) for _ in range(4)]
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    paper = PaperSGD([ours], lr=0.01, momentum=0.9, weight_decay=5e-4)
    pytorch = torch.optim.SGD([theirs], lr=0.01, momentum=0.9, weight_decay=5e-4)
    for step, g in enumerate(grads):
        if step == 2:
            for opt in (paper, pytorch):
                opt.param_groups[0]["lr"] = 0.001
        for p, opt in ((ours, paper), (theirs, pytorch)):
            p.grad = g.clone()
            opt.step()
        if step < 2:
            assert torch.allclose(ours, theirs, rtol=0, atol=1e-15)
        else:
            assert not torch.allclose(ours, theirs, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Plateau decay, warm start and stopping on scripted validation curves


def run_schedule(schedule: PlateauSchedule, scores: list[float]) -> list[tuple[float, bool, str]]:
    out = []
    for score in scores:
        decision = schedule.step(score)
        out.append((decision.lr, decision.dropped, decision.stop))
        if decision.stop:
            break
    return out


def test_modern_schedule_drops_on_plateaus_and_stops_early():
    schedule = PlateauSchedule(base_lr=1.0, factor=0.1, patience=2, max_drops=2, early_stop=5)
    steps = run_schedule(schedule, [1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3])
    lrs = [round(lr, 6) for lr, _, _ in steps]
    # epochs 3-4 plateau -> drop; 5 improves; 6-7 plateau -> drop; 8-9 plateau -> no drops left;
    # 10: five epochs without a better score -> stop.
    assert lrs == [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01]
    assert [d for _, d, _ in steps] == [False, False, False, True, False, False, True, False, False, False]
    assert steps[-1][2] == "no better score for 5 epochs" and len(steps) == 10


def test_paper_schedule_stops_at_the_plateau_after_the_third_drop():
    schedule = PlateauSchedule(base_lr=0.01, factor=0.1, patience=2, max_drops=3, stop_after_last_drop=True)
    steps = run_schedule(schedule, [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5])
    drops = [i + 1 for i, (_, dropped, _) in enumerate(steps) if dropped]
    assert drops == [3, 6, 9]
    assert steps[-1][2] == "a plateau after the last of 3 learning-rate drops" and len(steps) == 12
    assert steps[-1][0] == pytest.approx(1e-5)


def test_warm_start_comes_down_to_the_base_rate_before_counted_drops():
    schedule = PlateauSchedule(
        base_lr=0.01, factor=0.1, patience=1, max_drops=1, warm_start=50.0, stop_after_last_drop=True
    )
    assert schedule.lr == pytest.approx(0.5)
    steps = run_schedule(schedule, [1, 1, 1, 1, 1])
    # epoch 1 improves (first score); then each epoch is a plateau: 0.5 -> 0.05 -> 0.01 (clipped
    # at the base rate; both uncounted) -> 0.001 (the one drop) -> stop
    assert [round(lr, 6) for lr, _, _ in steps] == [0.5, 0.05, 0.01, 0.001, 0.001]
    assert steps[-1][2] and schedule.drops == 1


def test_schedule_state_round_trips():
    a = PlateauSchedule(base_lr=1.0, patience=1, max_drops=5)
    run_schedule(a, [3, 2, 2])
    b = PlateauSchedule(base_lr=1.0)
    b.load_state_dict(a.state_dict())
    assert b == a


def scripted_trainer(monkeypatch, tmp_path, scores, **config) -> Trainer:
    """A Trainer on tiny Shapes whose evaluation returns the scripted top-1 values."""
    curve = iter(scores)

    def fake_evaluate(model, loader, num_classes, multilabel=False, amp="off", channels_last=False):
        top1 = next(curve)
        return EvalResult(loss=1.0, top1=top1, top5=100.0, count=10, confusion=torch.zeros(10, 10, dtype=torch.int64))

    monkeypatch.setattr(trainer_module, "evaluate", fake_evaluate)
    data = load_dataset("Shapes", DataOptions(shapes_train=16, shapes_test=8))
    cfg = TrainConfig(model="CifarAlexNet", batch_size=16, output_dir=str(tmp_path), **config)
    return Trainer(cfg, CifarAlexNet(10), data, torch.device("cpu"))


def test_trainer_stops_early_on_a_scripted_curve(monkeypatch, tmp_path):
    trainer = scripted_trainer(
        monkeypatch, tmp_path, [10, 20, 20, 20, 20, 20, 20, 20], n_epoch=8, early_stop=3, plateau_patience=2, lr=1e-4
    )
    summary = trainer.fit()
    assert summary["epochs"] == 5 and summary["best_epoch"] == 2 and summary["best_top1"] == 20
    assert summary["stop_reason"] == "no better score for 3 epochs"
    assert summary["final_lr"] == pytest.approx(1e-5) and summary["lr_drops"] == 1
    saved = torch.load(tmp_path / "checkpoints" / "Shapes" / summary["run_name"] / "last.pt", weights_only=True)
    assert saved["epoch"] == 5 and saved["scheduler"]["drops"] == 1 and saved["scheduler"]["stale"] == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_trainer_paper_setup_ends_at_the_plateau_after_the_last_drop(monkeypatch, tmp_path):
    trainer = scripted_trainer(
        monkeypatch,
        tmp_path,
        [5, 5, 6, 6, 7, 7, 7, 7, 7],
        n_epoch=90,
        early_stop=0,
        plateau_patience=1,
        max_lr_drops=2,
        stop_after_last_drop=True,
        optimizer="sgd",
        paper_update=True,
        lr=0.01,
        dry_run=True,
    )
    assert isinstance(trainer.optimizer, PaperSGD)
    summary = trainer.fit()
    assert summary["epochs"] == 6 and summary["lr_drops"] == 2
    assert summary["stop_reason"] == "a plateau after the last of 2 learning-rate drops"
    assert not (tmp_path / "runs").exists()  # dry run


# ---------------------------------------------------------------------------------------------
# The confusion figure


@pytest.mark.parametrize("classes", [10, 20, 100])
def test_confusion_figure_is_labelled_up_to_20_classes_and_a_heat_map_beyond(classes):
    confusion = torch.randint(0, 5, (classes, classes))
    fig = confusion_figure(confusion, [f"class{i}" for i in range(classes)], "title")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    if classes <= 20:
        assert labels == [f"class{i}" for i in range(classes)]
        assert len(ax.texts) == int((confusion > 0).sum())  # every non-zero count written in its cell
    else:
        assert labels == [f"class{i}" for i in range(0, 100, 10)] and not ax.texts
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Run names and wrapped models


def test_a_new_run_name_is_free_under_runs_checkpoints_and_log(tmp_path):
    config = TrainConfig(dataset="Shapes", model="CifarAlexNet", setup="modern")
    first = new_run_name(tmp_path, config)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_Shapes_CifarAlexNet_modern", first)
    (tmp_path / "runs" / "Shapes" / first).mkdir(parents=True)
    second = new_run_name(tmp_path, config)
    assert second.startswith(first) and second != first
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / f"{second}.log").write_text("a dry run's log\n")  # a log alone takes the name too
    third = new_run_name(tmp_path, config)
    assert third not in (first, second) and taken(tmp_path, "Shapes", third) is None


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
