"""Every choice that differs on a CUDA GPU, made in one place: ``Capabilities``.

A GPU changes how this tool runs: the default autocast precision (by compute capability),
channels-last, the fused optimiser, where streamed JPEGs are decoded (nvJPEG, in the training
process, instead of in the DataLoader workers), where the training augmentation runs, pinned
memory, the process group's backend and cuDNN's autotuner. Each is a property of
``Capabilities``, read from the machine once (``Capabilities.of``) and handed to whatever decides.
Which device a command runs on at all is decided here too: ``resolve_device`` reads ``--device``.

No machine that runs this project's tests has a GPU, so the tests build
``Capabilities.stand_in()``: the CPU taking every CUDA branch that can run on a CPU (fp16 loss
scaling, the fused optimiser, decoding JPEG bytes in the training process with torchvision's CPU
decoder standing in for nvJPEG, augmentation there). What needs the hardware itself (pinned
memory, NCCL, cuDNN, free GPU memory) follows the tensors' real device and stays CPU. A whole
command can take the stand-in too: with ``ALEXNET_CUDA_STAND_IN=9.0`` (a compute capability) in
its environment, ``--device cpu`` does (``tools/gpu_check.sh --rehearse``, which rehearses the
GPU check on a CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from utils import UserError, quoted


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX); elsewhere
    oneDNN emulates them and bf16 is slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


#: Compute capability from which CUDA GPUs have bf16 tensor cores (Ampere, 8.0). Volta (7.0) and
#: Turing (7.5) have fp16 tensor cores only: bf16 there is emulated and slower than fp32.
BF16_CAPABILITY = (8, 0)
#: Compute capability of the first fp16 tensor cores (Volta); below it autocast gains nothing.
FP16_CAPABILITY = (7, 0)


#: The environment variable that makes the CPU stand in for a GPU of that compute capability.
STAND_IN = "ALEXNET_CUDA_STAND_IN"


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = text.strip().partition(".")
    if not (major.isdigit() and (minor or "0").isdigit()):
        raise ValueError(f"{STAND_IN}={text!r} is not a compute capability such as 9.0")
    return int(major), int(minor or 0)


@dataclass(frozen=True)
class Capabilities:
    """A training device and what follows from it.

    ``device`` is where tensors go. ``cuda`` says whether the CUDA branches are taken: true on a
    CUDA GPU, and for the CPU stand-in of the tests (``stand_in``). ``capability`` is the GPU's
    compute capability, ``name`` its name, ``cuda_devices`` how many CUDA devices the machine
    has; ``native_bf16`` whether the CPU computes bf16 in hardware.
    """

    device: torch.device
    cuda: bool = False
    capability: tuple[int, int] | None = None
    name: str = "cpu"
    cuda_devices: int = 0
    native_bf16: bool = False

    @classmethod
    def of(cls, device: torch.device | str) -> Capabilities:
        """What ``device`` of this machine can do (it must exist: ``resolve_device``)."""
        device = torch.device(device)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return cls(
                device,
                cuda=True,
                capability=tuple(torch.cuda.get_device_capability(index)),
                name=torch.cuda.get_device_name(index),
                cuda_devices=torch.cuda.device_count(),
            )
        stand_in = os.environ.get(STAND_IN, "")
        if device.type == "cpu" and stand_in:
            return cls.stand_in(_capability(stand_in))
        return cls(device, name=device.type, native_bf16=device.type == "cpu" and cpu_has_native_bf16())

    @classmethod
    def stand_in(cls, capability: tuple[int, int] = (9, 0), cuda_devices: int = 1) -> Capabilities:
        """The CPU taking the CUDA branches of a GPU of ``capability`` (default: an H100's),
        for tests."""
        return cls(
            torch.device("cpu"),
            cuda=True,
            capability=capability,
            name="CPU standing in for CUDA",
            cuda_devices=cuda_devices,
        )

    # --- precision and layout -----------------------------------------------------------------

    @property
    def amp(self) -> str:
        """The default autocast precision: bf16 on GPUs with bf16 tensor cores (no loss scaling
        needed), fp16 with loss scaling on Volta and Turing, off on older GPUs; on a CPU bf16
        where it is native (1.7x the fp32 training speed of CifarAlexNet on a 2-core AVX512-BF16
        EPYC), else off."""
        if self.cuda:
            major_minor = self.capability or (0, 0)
            if major_minor >= BF16_CAPABILITY:
                return "bf16"
            return "fp16" if major_minor >= FP16_CAPABILITY else "off"
        return "bf16" if self.native_bf16 else "off"

    def amp_warning(self, amp: str) -> str | None:
        """Why autocast ``amp`` (asked for on the command line) is slow here, or None: bf16 on a
        GPU without bf16 tensor cores, or on a CPU without native bf16, is emulated."""
        if amp != "bf16" or self.amp == "bf16" or (self.cuda and self.capability is None):
            return None
        where = f"compute capability {self.capability[0]}.{self.capability[1]}" if self.cuda else "this CPU"
        return f"--amp bf16 is emulated on {where} and slower than fp32; --amp {self.amp} is this device's default"

    @property
    def channels_last(self) -> bool:
        """NHWC by default where convolutions run fastest in it: tensor cores (fp16 and bf16) and
        oneDNN's bf16 kernels, i.e. wherever autocast is on by default."""
        return self.amp != "off"

    # --- optimiser ------------------------------------------------------------------------------

    @property
    def fused_optimizer(self) -> bool:
        """Adam's fused kernel (one launch for every tensor instead of a dozen per tensor); it
        also takes GradScaler's scale and found-inf flag on the device, without a host sync."""
        return self.cuda

    # --- data -----------------------------------------------------------------------------------

    @property
    def decode_in_process(self) -> bool:
        """Streamed JPEGs are decoded by the training process in one batched call (nvJPEG) rather
        than by the DataLoader workers, which then only read bytes."""
        return self.cuda

    @property
    def augment_in_workers(self) -> bool:
        """The DataLoader workers also augment streamed training batches (decoding and augmenting
        cost about the same on a CPU); on a GPU the batch is augmented there, after decoding."""
        return not self.cuda

    @property
    def pin_memory(self) -> bool:
        """Page-locked host buffers for copies to the device: only to a real GPU."""
        return self.device.type == "cuda"

    def free_memory(self) -> int | None:
        """Bytes free where a data set placed on this device would live: the GPU's free memory,
        or the host's available RAM (None where the system does not say)."""
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None

    # --- processes and kernels --------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The process group's backend under torchrun: NCCL between GPUs, gloo otherwise."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def autotune(self) -> bool:
        """Let cuDNN time its convolution algorithms once per shape and keep the fastest (off
        under ``--deterministic``, which the caller decides)."""
        return self.device.type == "cuda"

    def describe(self) -> str:
        """The device in a log line: its name and, on a GPU, its compute capability."""
        if self.capability is None:
            return str(self.device)
        return f"{self.device} ({self.name}, compute capability {self.capability[0]}.{self.capability[1]})"


def capabilities(device: torch.device | str | Capabilities) -> Capabilities:
    """``device``'s capabilities; a ``Capabilities`` is taken as it is (a test's stand-in)."""
    return device if isinstance(device, Capabilities) else Capabilities.of(device)


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a device this tool trains on (cpu, cuda, cuda:N), or None."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return f"{quoted(name)} is not a device name; use cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"{quoted(name)} is a {device.type} device; this tool trains on cpu, cuda or cuda:N"
    return None


def resolve_device(name: str | None) -> torch.device:
    """The device for ``--device``: CUDA when present unless told otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(name)
    if problem:
        raise UserError(f"--device {problem}.")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for CUDA, but this machine has no usable CUDA GPU; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has only {torch.cuda.device_count()} CUDA device(s).")
    return device
