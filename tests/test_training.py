"""The trainer: the paper's update rule, plateau decay and stopping, checkpoints, resume,
--evaluate, and the TensorBoard record."""

import json
from pathlib import Path

import pytest
import torch
from main_cli import TINY, only, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import trainer as trainer_module
from datasets import DataOptions, load_dataset
from network import CifarAlexNet
from trainer import EvalResult, PaperSGD, PlateauSchedule, TrainConfig, Trainer, confusion_figure

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
    schedule = PlateauSchedule(base_lr=0.01, factor=0.1, patience=1, max_drops=1, warm_start=50.0,
                               stop_after_last_drop=True)  # fmt: skip
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
    trainer = scripted_trainer(monkeypatch, tmp_path, [10, 20, 20, 20, 20, 20, 20, 20], n_epoch=8, early_stop=3,
                               plateau_patience=2, lr=1e-4)  # fmt: skip
    summary = trainer.fit()
    assert summary["epochs"] == 5 and summary["best_epoch"] == 2 and summary["best_top1"] == 20
    assert summary["stop_reason"] == "no better score for 3 epochs"
    assert summary["final_lr"] == pytest.approx(1e-5) and summary["lr_drops"] == 1
    saved = torch.load(tmp_path / "checkpoints" / "Shapes" / summary["run_name"] / "last.pt", weights_only=True)
    assert saved["epoch"] == 5 and saved["scheduler"]["drops"] == 1 and saved["scheduler"]["stale"] == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_trainer_paper_setup_ends_at_the_plateau_after_the_last_drop(monkeypatch, tmp_path):
    trainer = scripted_trainer(monkeypatch, tmp_path, [5, 5, 6, 6, 7, 7, 7, 7, 7], n_epoch=90, early_stop=0,
                               plateau_patience=1, max_lr_drops=2, stop_after_last_drop=True, optimizer="sgd",
                               paper_update=True, lr=0.01, dry_run=True)  # fmt: skip
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
# Through the command line: TensorBoard, checkpoints, resume, --evaluate


def test_tensorboard_holds_every_tag_and_checkpoints_hold_every_state(tmp_path):
    result = run("-c", "-ne", "2", "-lls", "1", "-lce", "1", "-m", "hello there", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = only(tmp_path / "runs" / "Shapes", "*")
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "train/epoch", "val/loss", "val/top1", "val/top5", "val/top1_max"):
        assert f"Shapes/{tag}" in tags["scalars"], tag
    assert {"Shapes/train/augmented", "Shapes/val/confusion"} <= set(tags["images"])
    assert len(events.Images("Shapes/val/confusion")) == 2 and len(events.Images("Shapes/train/augmented")) == 1
    assert {"config/text_summary", "message/text_summary"} <= set(tags["tensors"])
    message = events.Tensors("message/text_summary")[0].tensor_proto.string_val[0].decode()
    assert message == "hello there"
    assert "_hparams_/session_end_info" in events.PluginTagToContent("hparams")
    assert {"hparam/best_top1", "hparam/best_top5"} <= set(tags["scalars"])
    steps = [e.step for e in events.Scalars("Shapes/val/top1")]
    assert steps == [3, 6]  # the training step at the end of each epoch: 120 images / 40
    assert [e.value for e in events.Scalars("Shapes/train/epoch")] == [1, 2]

    checkpoint = torch.load(only(tmp_path / "checkpoints" / "Shapes", "*/last.pt"), weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "global_step", "best_metric", "best", "best_epoch", "rng",
            "config", "version", "classes", "top1_max", "train_images", "train_seconds"} <= set(checkpoint)  # fmt: skip
    assert {"torch", "index", "augment"} <= set(checkpoint["rng"])
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 6
    assert checkpoint["config"] == json.loads((run_dir / "config.json").read_text())
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])
    assert checkpoint["scheduler"]["lr"] == pytest.approx(1e-4)


def final_weights(root: Path) -> dict:
    return torch.load(only(root / "checkpoints" / "Shapes", "*/last.pt"), weights_only=True)["model"]


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir()
    split.mkdir()
    flags = ["-c", "--seed", "3", "--deterministic", "-lls", "1", *TINY]
    assert run(*flags, "-ne", "3", cwd=whole).returncode == 0
    first = run(*flags, "-ne", "2", cwd=split)
    assert first.returncode == 0, first.stderr
    last = only(split / "checkpoints" / "Shapes", "*/last.pt")
    second = run("--resume", str(last), "-ne", "3", cwd=tmp_path)  # from elsewhere: folders come from the path
    assert second.returncode == 0, second.stderr
    assert "resumed after epoch 2 (step 6)" in second.stderr

    a = json.loads(only(whole / "runs" / "Shapes", "*/summary.json").read_text())
    b = json.loads(only(split / "runs" / "Shapes", "*/summary.json").read_text())
    for key in ("final_top1", "final_top5", "best_top1", "best_epoch", "epochs", "steps", "final_lr"):
        assert a[key] == b[key], key
    wa, wb = final_weights(whole), final_weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(list((split / "runs" / "Shapes").iterdir())) == 1  # the same run folder

    events = EventAccumulator(str(only(split / "runs" / "Shapes", "*")))
    events.Reload()
    assert [e.step for e in events.Scalars("Shapes/val/top1")] == [3, 6, 9]
    assert len(events.Scalars("Shapes/train/loss")) == 9


def test_evaluate_reproduces_the_recorded_metric(tmp_path):
    assert run("-c", "-ne", "2", *TINY, cwd=tmp_path).returncode == 0
    best = only(tmp_path / "checkpoints" / "Shapes", "*/best.pt")
    recorded = torch.load(best, weights_only=True)
    result = run("--evaluate", str(best), cwd=tmp_path / "checkpoints")  # data are regenerated: Shapes
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["top1"] == recorded["best"]["top1"] and metrics["loss"] == recorded["best"]["loss"]
    assert metrics["count"] == 40
    assert not (tmp_path / "checkpoints" / "runs").exists()  # evaluation writes nothing


def test_evaluate_uses_ten_crops_for_a_paper_setup_run(tmp_path):
    flags = ["-pm", "-pt", "-ne", "1", "--shapes-train", "8", "--shapes-test", "4", "--batch-size", "4"]
    assert run(*flags, cwd=tmp_path).returncode == 0
    best = only(tmp_path / "checkpoints" / "Shapes", "*/best.pt")
    result = run("--evaluate", str(best), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(10-crop)" in result.stderr
    assert json.loads(result.stdout)["top1"] == torch.load(best, weights_only=True)["best"]["top1"]


@pytest.fixture(scope="module")
def shapes_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    assert run("-c", "-ne", "1", *TINY, cwd=root).returncode == 0
    return only(root / "checkpoints" / "Shapes", "*/last.pt")


def write_bad(kind: str, path: Path, good: Path) -> None:
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:1000])
    elif kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 10)
    elif kind == "not a dict":
        torch.save([1, 2, 3], path)
    elif kind == "foreign pickle":
        torch.save({"model": {}, "config": Path("x"), "epoch": 1, "classes": []}, path)
    elif kind == "no config":
        torch.save({"model": {}, "epoch": 1}, path)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", r"checkpoint .*nowhere.pt does not exist; pass the path of a last.pt or best.pt\."),
        ("truncated", r"checkpoint .*bad.pt cannot be loaded \(.*\); it is damaged or was not written by this tool"),
        ("random bytes", r"checkpoint .*bad.pt cannot be loaded"),
        ("not a dict", r"bad.pt is not a checkpoint written by this tool \(it lacks model, config, epoch, classes\)"),
        ("foreign pickle", r"checkpoint .*bad.pt cannot be loaded \(.*\); it is damaged or was not written"),
        ("no config", r"bad.pt is not a checkpoint written by this tool \(it lacks config, classes\)"),
    ],
)
@pytest.mark.parametrize("mode", ["--resume", "--evaluate"])
def test_bad_checkpoints_are_one_sentence(tmp_path, shapes_checkpoint, kind, message, mode):
    path = tmp_path / ("nowhere.pt" if kind == "missing" else "bad.pt")
    write_bad(kind, path, shapes_checkpoint)
    result = run(mode, str(path), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    import re

    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "runs").exists()


def test_checkpoint_of_another_model_or_class_count(tmp_path, shapes_checkpoint, shared_data):
    other_model = run("--evaluate", str(shapes_checkpoint), "-pm", cwd=tmp_path)
    assert other_model.returncode == 1
    assert "holds a CifarAlexNet, but this command builds a CifarAlexNet" not in other_model.stderr
    assert "does not fit CifarAlexNet" in other_model.stderr  # the paper-width CifarAlexNet
    classes = run("--evaluate", str(shapes_checkpoint), "-ds", "Cifar100", "--data-dir", str(shared_data), cwd=tmp_path)
    assert classes.returncode == 1
    assert "was trained on 10 classes (Shapes), but Cifar100 has 100; pass a checkpoint trained on Cifar100." in (
        classes.stderr
    )


def test_checkpoint_of_torch_alexnet_refuses_the_cifar_model(tmp_path):
    assert (
        run("-ne", "1", "--shapes-train", "8", "--shapes-test", "4", "--batch-size", "8", cwd=tmp_path).returncode == 0
    )
    path = only(tmp_path / "checkpoints" / "Shapes", "*/last.pt")
    result = run("--evaluate", str(path), "-c", cwd=tmp_path)
    assert result.returncode == 1
    assert "holds a TorchAlexNet, but this command builds a CifarAlexNet; drop the model flags" in result.stderr


def test_resume_refuses_flags_that_change_the_run(tmp_path, shapes_checkpoint):
    result = run("--resume", str(shapes_checkpoint), "--batch-size", "64", "-ds", "Cifar10", cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "fixes these settings, which the command line changes: batch_size (64; the checkpoint has 40), "
        "dataset ('Cifar10'; the checkpoint has 'Shapes'); drop those flags." in result.stderr
    )


def test_the_seeds_tag_filters_select_our_tags():
    import re

    tags = [f"{ds}/{t}" for ds in ("Cifar10", "Cifar100", "PascalVOC2012")
            for t in ("train/loss", "val/top1", "val/top5", "val/top1_max", "val/mAP")]  # fmt: skip
    assert [t for t in tags if re.search(r"PascalVOC2012/.*/.*top", t)] == [
        "PascalVOC2012/val/top1", "PascalVOC2012/val/top5", "PascalVOC2012/val/top1_max"]  # fmt: skip
    assert [t for t in tags if re.search(r"Cifar10/.*/top\d", t)] == ["Cifar10/val/top1", "Cifar10/val/top5",
                                                                       "Cifar10/val/top1_max"]  # fmt: skip
    assert [t for t in tags if re.search(r"Cifar10/.*/.*max", t)] == ["Cifar10/val/top1_max"]
