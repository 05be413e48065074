"""What a GPU changes, decided in one place (``hardware.capabilities.Capabilities``), and each
CUDA branch run on the CPU through ``Capabilities.stand_in``: the autocast default by compute
capability, the fused optimiser and its checkpoints, decoding streamed JPEGs in the training
process, checkpoints that hold CPU tensors only, and the torch.compile warm-up."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fakedata import write_photos

import main
from data.core import DataOptions, DataSet, Split
from data.loaders import BatchLoader
from data.registry import load_dataset
from data.shards import shard_split
from hardware.capabilities import Capabilities
from network import CifarAlexNet
from trainer import Trainer
from training.checkpoint import load_checkpoint
from training.config import TrainConfig, config_from_args
from training.outputs import claim_run
from training.resume import load_weights, on_cpu, with_machine_flags

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# The defaults, by compute capability


@pytest.mark.parametrize(
    "capability, amp",
    [((9, 0), "bf16"), ((8, 6), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16"), ((6, 1), "off")],
)
def test_autocast_default_follows_the_compute_capability(capability, amp):
    # bf16 tensor cores arrived with Ampere (8.0); Volta and Turing (7.x) have fp16 ones only.
    hw = Capabilities.stand_in(capability)
    assert hw.amp == amp
    assert hw.channels_last is (amp != "off")


def patch_gpu(monkeypatch, name: str, capability: tuple[int, int], count: int = 1) -> None:
    """Make torch.cuda describe one GPU of ``capability`` (nothing on it is run)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize(
    "name, capability, amp",
    [
        ("Tesla V100-SXM2-16GB", (7, 0), "fp16"),
        ("Tesla T4", (7, 5), "fp16"),
        ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16"),
        ("Tesla P100-PCIE-16GB", (6, 0), "off"),
    ],
)
def test_a_new_runs_autocast_is_chosen_by_the_cards_capability(monkeypatch, name, capability, amp):
    patch_gpu(monkeypatch, name, capability)
    config = config_from_args(main.get_args_parser().parse_args([]), torch.device("cuda"))
    assert (config.amp, config.channels_last) == (amp, amp != "off")
    assert Capabilities.of("cuda").describe() == f"cuda ({name}, compute capability {capability[0]}.{capability[1]})"


def test_bf16_asked_for_where_it_is_emulated_is_warned_about():
    assert Capabilities.stand_in((7, 0)).amp_warning("bf16") == (
        "--amp bf16 is emulated on compute capability 7.0 and slower than fp32; --amp fp16 is this device's default"
    )
    assert Capabilities.stand_in((8, 0)).amp_warning("bf16") is None
    assert Capabilities.stand_in((7, 0)).amp_warning("fp16") is None
    assert Capabilities(CPU).amp_warning("bf16") == (
        "--amp bf16 is emulated on this CPU and slower than fp32; --amp off is this device's default"
    )


def test_a_cpus_default_is_bf16_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert (Capabilities.of(CPU).amp, Capabilities.of(CPU).channels_last) == ("off", False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert (Capabilities.of(CPU).amp, Capabilities.of(CPU).channels_last) == ("bf16", True)


def test_what_needs_the_hardware_itself_follows_the_real_device():
    hw = Capabilities.stand_in()
    assert (hw.cuda, hw.fused_optimizer, hw.decode_in_process, hw.augment_in_workers) == (True, True, True, False)
    assert (hw.pin_memory, hw.backend, hw.autotune) == (False, "gloo", False)  # a CPU underneath
    plain = Capabilities.of(CPU)
    assert (plain.fused_optimizer, plain.decode_in_process, plain.augment_in_workers) == (False, False, True)


# ---------------------------------------------------------------------------------------------
# The optimiser: fused where the device says, and checkpoints that resume on either kind


@pytest.fixture(scope="module")
def shapes() -> DataSet:
    return load_dataset("Shapes", DataOptions(shapes_train=32, shapes_test=16))


def one_epoch(tmp_path: Path, shapes: DataSet, hw, **config) -> tuple[Trainer, Path]:
    cfg = TrainConfig(
        model="CifarAlexNet",
        batch_size=16,
        n_epoch=1,
        output_dir=str(tmp_path),
        optimizer="adam",
        lr=1e-4,
        amp="off",
        channels_last=False,
        **config,
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, CifarAlexNet(10), shapes, hw)
    summary = trainer.fit()
    return trainer, tmp_path / "checkpoints" / "Shapes" / summary["run_name"] / "last.pt"


@pytest.mark.parametrize("saved_on, resumed_on", [("gpu", "cpu"), ("cpu", "gpu")])
def test_an_adam_run_resumes_on_the_other_kind_of_device(tmp_path, shapes, saved_on, resumed_on):
    kinds = {"gpu": Capabilities.stand_in(), "cpu": Capabilities.of(CPU)}
    first, last = one_epoch(tmp_path, shapes, kinds[saved_on])
    assert first.optimizer.param_groups[0]["fused"] is (True if saved_on == "gpu" else None)
    checkpoint = load_checkpoint(last, resume=True)
    assert checkpoint["optimizer"]["param_groups"][0]["fused"] is (True if saved_on == "gpu" else None)
    config = replace(TrainConfig.from_dict(checkpoint["config"]), n_epoch=2)
    model = CifarAlexNet(10)
    load_weights(checkpoint, last, model, shapes.num_classes, shapes.name)
    folders = claim_run(config, last, checkpoint["global_step"])
    second = Trainer(config, model, shapes, kinds[resumed_on], resume=checkpoint, folders=folders)
    # The state is the saved one; how the optimiser runs is this machine's choice.
    assert second.optimizer.param_groups[0]["fused"] is (True if resumed_on == "gpu" else None)
    saved_state = checkpoint["optimizer"]["state"]
    for index, param in enumerate(p for g in second.optimizer.param_groups for p in g["params"]):
        state = second.optimizer.state[param]
        assert torch.equal(state["exp_avg"], saved_state[index]["exp_avg"])
        assert float(state["step"]) == float(saved_state[index]["step"])
    assert second.fit()["epochs"] == 2


def test_machine_flags_are_replaced_and_a_missing_group_stays_missing():
    param = torch.nn.Parameter(torch.zeros(3))
    ours = torch.optim.Adam([param], fused=None)
    theirs = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], fused=True).state_dict()
    theirs["param_groups"][0]["capturable"] = True
    fixed = with_machine_flags(theirs, ours)
    group = fixed["param_groups"][0]
    assert (group["fused"], group["capturable"], group["foreach"]) == (None, False, None)
    assert theirs["param_groups"][0]["fused"] is True  # the checkpoint's own dict is left alone
    extra = {**theirs, "param_groups": theirs["param_groups"] * 2}
    assert len(with_machine_flags(extra, ours)["param_groups"]) == 2  # for the check to refuse


# ---------------------------------------------------------------------------------------------
# Checkpoints hold CPU tensors only


def test_every_tensor_of_a_checkpoint_is_moved_to_the_cpu():
    class Elsewhere(torch.Tensor):
        """A tensor that says it lives on a GPU until ``.cpu()`` brings it back."""

        @property
        def device(self) -> torch.device:
            return torch.device("cuda", 0)

        def cpu(self) -> torch.Tensor:
            return torch.Tensor(self.as_subclass(torch.Tensor).clone())

    gpu = torch.arange(3.0).as_subclass(Elsewhere)
    state = {"model": {"w": gpu}, "rng": {"cuda": [gpu]}, "pair": (gpu, 1), "n": 2}
    moved = on_cpu(state)
    leaves = [moved["model"]["w"], moved["rng"]["cuda"][0], moved["pair"][0]]
    assert all(type(t) is torch.Tensor and t.device == CPU for t in leaves)
    assert moved["pair"][1] == 1 and moved["n"] == 2 and torch.equal(leaves[0], torch.arange(3.0))


# ---------------------------------------------------------------------------------------------
# Streaming: the training process decodes JPEG bytes on a GPU (CPU decoder standing in)


class Unchanged:
    views = 1

    def train(self, x, generator=None):
        return x

    def evaluate(self, x):
        return x


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Split:
    photos = write_photos(tmp_path_factory.mktemp("photos"), 11)
    return shard_split(
        photos, torch.arange(11), tmp_path_factory.mktemp("cache"), "train", 16, workers=1, shard_images=4
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_decoded_in_the_training_process_equal_the_workers_decode(stored, workers):
    gpu = BatchLoader(stored, 4, Unchanged(), False, Capabilities.stand_in(), workers=workers)
    cpu = BatchLoader(stored, 4, Unchanged(), False, CPU, workers=workers)
    assert not gpu.augment_in_workers
    pairs = list(zip(gpu, cpu, strict=True))
    assert len(pairs) == 3
    for (a, la), (b, lb) in pairs:
        assert torch.equal(a, b) and torch.equal(la, lb)


# ---------------------------------------------------------------------------------------------
# The torch.compile warm-up


def test_the_warm_up_batch_is_this_process_share_of_the_global_batch(tmp_path, shapes, monkeypatch):
    cfg = TrainConfig(
        model="CifarAlexNet", batch_size=16, output_dir=str(tmp_path), dry_run=True, amp="off", channels_last=False
    )
    trainer = Trainer(cfg, CifarAlexNet(10), shapes, CPU)
    sizes = []
    first = trainer.train_loader.first
    monkeypatch.setattr(trainer.train_loader, "first", lambda count, seed: sizes.append(count) or first(count, seed))
    for world, rank, expected in ((1, 0, 16), (2, 1, 8), (3, 0, 6), (3, 2, 5)):
        trainer.world, trainer.rank = world, rank
        trainer._warm_up(trainer.model)
        assert sizes[-1] == expected
    # what the loader really gives rank 2 of 3 from a batch of 16
    share = BatchLoader(shapes.train, 16, Unchanged(), True, CPU, index_generator=torch.Generator(), rank=2, world=3)
    assert len(next(iter(share))[0]) == 5
