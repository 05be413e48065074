"""``export``: ONNX and TorchScript files of every network kind give PyTorch's outputs (within
1e-4 in fp32) on a batch size other than the traced one, carry the preprocessing and class names
in their metadata, and the command never replaces a file without ``--force``."""

from __future__ import annotations

import io
import json
import os
import warnings

import pytest
import torch
from checkpoint_files import make_checkpoint

from inference.checkpoint import load_trained
from inference.export import EXTRA_FILE, METADATA_KEY, export, export_metadata, run_onnx, run_torchscript
from network import PaperAlexNet, SplitPaperAlexNet

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

#: The network kinds. The split one (``-pm --split-gpus``) exports the grouped PaperAlexNet: its
#: file is checked against SplitPaperAlexNet's outputs.
KINDS = {
    "cifar": ("CifarAlexNet", False, "code", False),
    "torch": ("TorchAlexNet", False, "code", False),
    "paper-code-split": ("PaperAlexNet", True, "code", True),
    "paper-text": ("PaperAlexNet", True, "text", False),
}


def onnx_metadata(data: bytes) -> dict:
    """What another program reads from an exported ONNX file: its ``metadata_props`` entry."""
    import onnx

    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    return json.loads(props[METADATA_KEY])


def torchscript_metadata(data: bytes) -> dict:
    """What another program reads from an exported TorchScript file: its extra file, the way
    docs/using-a-network.md shows (``torch.jit.load(f, _extra_files=...)``)."""
    files = {EXTRA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=files)
    return json.loads(files[EXTRA_FILE])


METADATA = {"onnx": onnx_metadata, "torchscript": torchscript_metadata}
RUN = {"onnx": run_onnx, "torchscript": run_torchscript}


@pytest.fixture(scope="module", params=list(KINDS))
def trained(request, tmp_path_factory):
    """One checkpoint per network kind, loaded once (export once per kind and format)."""
    model, paper_train, fidelity, split = KINDS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return load_trained(make_checkpoint(folder, model, paper_train, fidelity, split_gpus=split))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_and_carries_metadata(trained, fmt):
    """Outputs within 1e-4 on 5 real pipeline inputs (traced on 2), and the metadata round-trips."""
    size = trained.input_size
    g = torch.Generator().manual_seed(3)
    x = trained.preprocess(
        torch.randint(0, 256, (5, 3, trained.image_size, trained.image_size), generator=g, dtype=torch.uint8)
    )[:, 0].contiguous()
    data, difference = export(trained, fmt, x)
    assert difference <= 1e-4
    if trained.config.split_gpus:  # exported as the grouped model: the split one gives the same outputs
        assert isinstance(trained.model, PaperAlexNet)
        with torch.inference_mode():
            expected = SplitPaperAlexNet(trained.model, ("cpu", "cpu")).eval()(x)
        assert (RUN[fmt](data, x) - expected).abs().max().item() <= 1e-4
    metadata = METADATA[fmt](data)
    assert metadata == export_metadata(trained)
    assert metadata["classes"] == trained.classes and metadata["input"]["shape"] == ["N", 3, size, size]
    assert metadata["views"] == (10 if trained.config.paper_train and size != 32 else 1)
    assert metadata["preprocessing"]["kind"] == trained.pipeline.state()["kind"]


def test_export_command_never_replaces_a_file(tmp_path, run_main):
    """One CLI run: an existing OUT is refused in one sentence and left as it was."""
    out = tmp_path / "model.onnx"
    out.write_bytes(b"precious")
    result = run_main("export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "onnx", str(out), cwd=tmp_path)
    assert result.returncode == 1 and "already exists" in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == b"precious" and "Traceback" not in result.stderr


def test_export_writes_nothing_outside_out(tmp_path, run_main):
    """ONNX export with HOME and TMPDIR pointed at empty folders leaves them empty: no
    onnxruntime telemetry (a device id in ~/.cache/Microsoft, $TMPDIR/.ses) and no compiler
    cache (torchinductor_<user>) from the exporter."""
    checkpoint = make_checkpoint(tmp_path / "run", "CifarAlexNet")
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    ours = ("ORT_DISABLE_TELEMETRY", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME", "TMP", "TEMP")
    env = {**{k: v for k, v in os.environ.items() if k not in ours}, "HOME": str(home), "TMPDIR": str(tmp)}
    result = run_main(
        "export", "--checkpoint", str(checkpoint), "--format", "onnx", "model.onnx", cwd=tmp_path, env=env
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert (tmp_path / "model.onnx").stat().st_size > 0
    assert sorted(home.rglob("*")) == [] and sorted(tmp.rglob("*")) == []
