"""``python main.py export --checkpoint CKPT --format {onnx,torchscript} OUT``: the network as a
file other programs run, with what they need to feed it in the file's metadata.

The exported graph maps a float32 batch N x 3 x S x S (N free, S the checkpoint's input size:
32 or 224) of *preprocessed* views to N x classes logits. Preprocessing is the run's evaluation
pipeline, written into the metadata (``export_metadata``): resize the image's short side to
``image_size`` and centre-crop it, then for a ``cifar`` pipeline ``(x / 255 - mean) / std`` per
channel (then bilinear upsampling to S when S > the image size), for ``modern`` the centre S crop
normalised the same way, and for ``paper`` (0-255 units) the ten S crops (corners, centre and
their mirrors) minus the mean image: under fidelity ``code`` its centre S crop is subtracted
from each crop, under ``text`` the whole mean is subtracted before cropping. Then softmax each
view (per-class sigmoid for ``multi-label``) and average over the views.

``SplitPaperAlexNet`` runs export as the grouped PaperAlexNet (checkpoints hold its weights; it is
the same function). After writing, the file is run (onnxruntime, ``torch.jit.load``) on a test
batch of another batch size than the one traced, and its largest difference from PyTorch is
reported; a difference beyond ``TOLERANCE`` is refused and nothing is written.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference.checkpoint import Trained, load_trained
from utils import UserError, __version__, atomic_write_bytes, quoted, short_reason

logger = logging.getLogger("alexnet")

#: ONNX operator set: 18 is the exporter's own default since torch 2.5 (>= 17, which has LRN,
#: AveragePool with ceil mode and the ops of every network here).
OPSET = 18
#: The largest acceptable difference between the exported model and PyTorch (fp32 logits).
TOLERANCE = 1e-3
#: Metadata keys (ONNX ``metadata_props``; TorchScript ``_extra_files`` as ``<key>.json``).
METADATA_KEY = "alexnet"
EXTRA_FILE = "alexnet.json"

EPILOG = """\
the file holds the network alone: it takes float32 N x 3 x S x S batches already preprocessed
(S = 32 for -c checkpoints, 224 otherwise) and returns N x classes logits. What preprocessing
means, the class names and the task travel in the file: ONNX metadata_props key "alexnet",
TorchScript extra file "alexnet.json", both one JSON object (see docs/using-a-network.md,
"export"). OUT is never replaced unless --force is given (then atomically)."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py export",
        description="Export a checkpoint's network.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="the file to write (.onnx, .pt)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="a last.pt or best.pt of this tool")
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="the file's format")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (off: refused)")
    return parser


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def export_metadata(trained: Trained) -> dict[str, Any]:
    """What a program needs to use the exported network, as one JSON-ready dict."""
    views = trained.pipeline.views
    return {
        "tool": f"alexnet {__version__}",
        "model": trained.config.model,
        "input": {
            "shape": ["N", 3, trained.input_size, trained.input_size],
            "dtype": "float32",
            "layout": "NCHW",
            "what": "preprocessed views (see preprocessing)",
        },
        "output": "logits N x classes",
        "classes": list(trained.classes),
        "task": "multi-label" if trained.multilabel else "single-label",
        "scores": "sigmoid per class" if trained.multilabel else "softmax",
        "image_size": trained.image_size,
        "views": views,
        "views_note": (
            "10-crop: the four corner crops, the centre crop and their mirrors; average the views' scores"
            if views > 1
            else "one view per image"
        ),
        "preprocessing": _jsonable(trained.pipeline.state()),
    }


def _test_batch(trained: Trained, n: int, seed: int) -> torch.Tensor:
    """Model inputs made by the real pipeline from random images (realistic ranges)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, trained.image_size, trained.image_size), generator=g, dtype=torch.uint8)
    return trained.preprocess(images)[:, 0].float().cpu().contiguous()


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` for the block, and as it was afterwards."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


#: onnxruntime's telemetry writes a device id under ``~/.cache/Microsoft`` and a session file
#: in ``$TMPDIR`` as soon as it is imported, unless this variable is set by then (its full
#: opt-out on Linux and macOS); ``disable_telemetry_events`` covers the Windows events. Export
#: writes OUT and nothing else.
NO_TELEMETRY = {"ORT_DISABLE_TELEMETRY": "1"}


def to_onnx(model: nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    """The ONNX file (opset ``OPSET``, dynamic batch) of ``model``, metadata included. Whatever
    the exporter writes goes to a temporary folder that is removed afterwards: torch's compiler
    would otherwise leave its cache folder (``torchinductor_<user>``) in ``$TMPDIR``."""
    import onnx

    # The exporter's optimiser logs every pass at INFO, which the tool's log setup would show.
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with (
        tempfile.TemporaryDirectory() as folder,
        warnings.catch_warnings(),
        environment(TORCHINDUCTOR_CACHE_DIR=str(Path(folder) / "inductor"), **NO_TELEMETRY),
    ):
        warnings.simplefilter("ignore")
        path = Path(folder) / "model.onnx"
        batch = torch.export.Dim("batch", min=1, max=65_536)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
        proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    proto.producer_name = "alexnet"
    return proto.SerializeToString()


def run_onnx(data: bytes, x: torch.Tensor) -> torch.Tensor:
    """The ONNX file's outputs on ``x`` (onnxruntime on the CPU, its telemetry off)."""
    with environment(**NO_TELEMETRY):
        import onnxruntime

        onnxruntime.disable_telemetry_events()
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def to_torchscript(model: nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    """The TorchScript file of ``model`` (traced; the batch size stays free), metadata included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: json.dumps(metadata)})
    return buffer.getvalue()


def run_torchscript(data: bytes, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.inference_mode():
        return module(x)


FORMATS = {"onnx": (to_onnx, run_onnx), "torchscript": (to_torchscript, run_torchscript)}


def export(trained: Trained, fmt: str, test: torch.Tensor | None = None) -> tuple[bytes, float]:
    """The exported file's bytes and the largest difference between its outputs and PyTorch's
    on ``test`` (default: 3 random images through the run's pipeline; the graph is traced on 2,
    so the free batch dimension is what runs)."""
    write, run = FORMATS[fmt]
    model = trained.model.cpu().eval()
    metadata = export_metadata(trained)
    try:
        data = write(model, _test_batch(trained, 2, 0), metadata)
    except Exception as error:  # noqa: BLE001 (the exporters raise many kinds; all mean "could not export")
        raise UserError(
            f"the {fmt} exporter failed on {trained.config.model} ({short_reason(error)}); try the other --format."
        ) from None
    x = _test_batch(trained, 3, 1) if test is None else test
    with torch.inference_mode():
        expected = model(x)
    difference = (run(data, x).float() - expected).abs().max().item()
    return data, difference


def main(argv: Sequence[str]) -> int:
    args = get_parser().parse_args(list(argv))
    out: Path = args.out
    if out.is_dir():
        raise UserError(f"{quoted(str(out))} is a folder; pass the path of the file to write.")
    if out.exists() and not args.force:
        raise UserError(f"{quoted(str(out))} already exists; pass another path, or --force to replace it.")
    if fmt_missing := _missing_packages(args.format):
        raise UserError(
            f"exporting to {args.format} needs {fmt_missing}; install it with "
            "python -m pip install -r requirements.txt."
        )
    trained = load_trained(args.checkpoint, "cpu")
    data, difference = export(trained, args.format)
    if not difference <= TOLERANCE:
        raise UserError(
            f"the exported {args.format} model differs from PyTorch by {difference:.3g} (more than "
            f"{TOLERANCE:g}); nothing was written, try the other --format."
        )
    try:
        atomic_write_bytes(data, out)
    except OSError as error:
        raise UserError(
            f"could not write {quoted(str(out))} ({error.strerror or short_reason(error)}); pass another path."
        ) from None
    logger.info(
        "wrote %s (%s, %.1f MB): %s, input float32 N x 3 x %d x %d; largest difference from PyTorch on a "
        "test batch %.2e",
        out,
        args.format,
        len(data) / 1e6,
        trained.config.model,
        trained.input_size,
        trained.input_size,
        difference,
    )
    return 0


def _missing_packages(fmt: str) -> str | None:
    if fmt != "onnx":
        return None
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
    return " and ".join(missing) if missing else None
