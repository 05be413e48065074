"""One preset per finding of the original v2 tool: the runs it compares, with every flag spelled out.

A preset's variants are written for the full data sets (``--scale full``). The two smaller
scales swap in data a CPU can train on in minutes, changing only the data set, its size, the
epoch budget and the batch size, so a small run is the same comparison on less data:

- ``small``: Shapes (and, where a finding is about a data set, the real CIFAR-100 / VOC samples
  read from ``--data-dir``), a few epochs; the runs behind the tables of experiments/README.md.
- ``tiny``: a few hundred Shapes images, one epoch; proves the path end to end (tests).

Flags are kept as ordered ``{flag: value}`` maps so a scale can replace a value: ``True`` is a
switch given alone, ``None`` removes the flag.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

Flags = Mapping[str, "str | bool | None"]

SCALES = ("full", "small", "tiny")

# The modern setup's values, written out so that a change of defaults in main.py cannot
# silently change what a preset measures.
MODERN: dict[str, str | bool | None] = {
    "--optimizer": "adam",
    "--lr": "1e-4",
    "--batch-size": "128",
    "--weight-decay": "0",
    "--plateau-patience": "5",
    "--lr-factor": "0.1",
    "--max-lr-drops": "3",
    "--warm-start": "1",
    "-ne": "200",
    "-es": "50",
    "-lce": "10",
}

# Small scale: 1,000 Shapes images for three epochs at batch 32 (94 steps) take two to three
# minutes per run on two shared CPU cores; batch 32 gives four times the steps of 128, and
# fewer steps than this leave every variant at chance.
SMALL_SHAPES: dict[str, str | bool | None] = {
    "-ds": "Shapes",
    "--shapes-train": "1000",
    "--shapes-test": "400",
    "--batch-size": "32",
    "-ne": "3",
    "-lce": "3",
}
# A 224-input network costs two to four times as much per training image on a CPU.
SMALL_SHAPES_224: dict[str, str | bool | None] = {
    **SMALL_SHAPES,
    "--shapes-train": "300",
    "--shapes-test": "150",
    "-ne": "2",
    "-lce": "2",
}

TINY: dict[str, str | bool | None] = {
    "-ds": "Shapes",
    "--shapes-train": "96",
    "--shapes-test": "48",
    "--batch-size": "32",
    "-ne": "1",
    "-lce": "1",
}


@dataclass(frozen=True)
class Variant:
    """One arm of a comparison: its name, what it is, its full-scale flags, and per-scale
    replacements applied after the preset's own (for variants that differ in the data)."""

    name: str
    about: str
    flags: Flags
    at_scale: Mapping[str, Flags] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    """A finding of the original v2 tool and the runs that test it."""

    name: str
    finding: str  # the original v2 tool's claim, in its words where it had some
    tests: str  # what the comparison measures and how to read it
    variants: tuple[Variant, ...]
    scales: Mapping[str, Flags] = field(default_factory=dict)  # replacements for every variant

    def variant(self, name: str) -> Variant:
        """The variant called ``name`` (KeyError naming the choices otherwise)."""
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"{self.name} has no variant {name!r} (it has {', '.join(v.name for v in self.variants)})")

    def flags(self, variant: Variant, scale: str) -> dict[str, str | bool | None]:
        """The variant's flags at ``scale``: full-scale flags, then the preset's replacements for
        the scale, then the variant's own."""
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
        merged = dict(variant.flags)
        if scale != "full":
            merged.update(self.scales.get(scale, {}))
            merged.update(variant.at_scale.get(scale, {}))
        return merged

    def argv(self, variant: Variant, scale: str) -> list[str]:
        """``main.py`` arguments of ``variant`` at ``scale`` (without seed and output folders)."""
        return flags_to_argv(self.flags(variant, scale))


def flags_to_argv(flags: Flags) -> list[str]:
    """``{"-c": True, "--lr": "1e-4", "-x": None}`` -> ``["-c", "--lr", "1e-4"]``."""
    argv: list[str] = []
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        argv.append(flag)
        if value is not True:
            argv.append(str(value))
    return argv


def _preset(name: str, finding: str, tests: str, variants: list[Variant], small: Flags) -> Preset:
    return Preset(name, finding, tests, tuple(variants), scales={"small": small, "tiny": TINY})


CIFAR10_SMALL_KERNEL = {"-ds": "Cifar10", "-c": True, **MODERN}
CIFAR10_224 = {"-ds": "Cifar10", **MODERN}
SHAPES_SMALL_KERNEL = {"-ds": "Shapes", "-c": True, **MODERN, "--shapes-test": "1600"}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _preset(
            "warm_start",
            "A large learning rate at the start helps: training gets going faster and ends higher.",
            "CifarAlexNet on CIFAR-10 with the modern setup (Adam, 1e-4, plateau decay), started at 10x the "
            "rate (--warm-start 10: 1e-3 until the first plateau brings it back to 1e-4, then the usual three "
            "drops) against the plain 1e-4 start. Read the best top-1 and how many epochs it took.",
            [
                Variant("plain", "Adam at 1e-4 from the start", {**CIFAR10_SMALL_KERNEL, "--warm-start": "1"}),
                Variant(
                    "warm10", "Adam at 1e-3 until the first plateau", {**CIFAR10_SMALL_KERNEL, "--warm-start": "10"}
                ),
            ],
            SMALL_SHAPES,
        ),
        _preset(
            "first_kernel",
            "Shrinking the first kernel (11x11/4 -> 3x3/1) beats resizing CIFAR to 224: faster and more accurate.",
            "CifarAlexNet (-c, 32x32 input, 3x3/1 conv1) against TorchAlexNet fed CIFAR-10 upsampled to 224 "
            "on the batch, same modern setup. Read the best top-1 and the images/s.",
            [
                Variant("small_kernel", "CifarAlexNet at 32x32", CIFAR10_SMALL_KERNEL),
                Variant("upsample_224", "TorchAlexNet, images upsampled to 224", CIFAR10_224),
            ],
            SMALL_SHAPES_224,
        ),
        _preset(
            "lrn",
            "Local response normalisation is useless on CIFAR.",
            "CifarAlexNet with the paper's features (-c -pm: widths, two-GPU grouping, LRN, paper init) with and "
            "without LRN (--no-lrn puts an identity where LRN was), modern setup on CIFAR-10. The paper credits "
            "LRN with 1.4 points of top-1 on ImageNet; the finding is that it buys nothing here. Both arms use "
            "the normalisation the 2012 network was trained with (--fidelity code: alpha divided by n, LRN before "
            "the first ReLU, cnorm2 after LRN2; --no-lrn drops cnorm2 as well).",
            [
                Variant(
                    "with_lrn",
                    "-c -pm --fidelity code, LRN (and cnorm2) in layers 1 and 2",
                    {**CIFAR10_SMALL_KERNEL, "-pm": True, "--fidelity": "code"},
                ),
                Variant(
                    "no_lrn",
                    "-c -pm --fidelity code --no-lrn",
                    {**CIFAR10_SMALL_KERNEL, "-pm": True, "--fidelity": "code", "--no-lrn": True},
                ),
            ],
            SMALL_SHAPES,
        ),
        _preset(
            "dataset_difficulty",
            "Pascal VOC is harder than CIFAR-100, which is harder than CIFAR-10.",
            "TorchAlexNet (the one network that takes all three) with the same modern setup on CIFAR-10, "
            "CIFAR-100 (both upsampled to 224) and Pascal VOC 2012 (multi-label, 256x256 cache). The metric is "
            "top-1 for CIFAR and mAP for VOC, so the ranking compares how far each is from perfect, not one "
            "number on one scale.",
            [
                Variant(
                    "cifar10",
                    "CIFAR-10, 10 classes",
                    CIFAR10_224,
                    # No CIFAR-10 sample is shared; Shapes (10 classes, 32x32) stands in for it.
                    at_scale={"small": {"-ds": "Shapes"}},
                ),
                Variant(
                    "cifar100",
                    "CIFAR-100, 100 fine classes",
                    {**CIFAR10_224, "-ds": "Cifar100"},
                    at_scale={"small": {"-ds": "Cifar100", "--shapes-train": None, "--shapes-test": None}},
                ),
                Variant(
                    "voc2012",
                    "Pascal VOC 2012, 20 classes, multi-label (mAP)",
                    {**CIFAR10_224, "-ds": "PascalVOC2012"},
                    at_scale={"small": {"-ds": "PascalVOC2012", "--shapes-train": None, "--shapes-test": None}},
                ),
            ],
            {**SMALL_SHAPES_224, "-ne": "1", "-lce": "1"},
        ),
        _preset(
            "lr_by_data_size",
            "A large learning rate helps most on large data.",
            "The warm start (--warm-start 10) against the plain start on a small and a 16x larger training set "
            "of the same distribution, CifarAlexNet, modern setup. main.py has no flag to train on a subset of "
            "CIFAR, so the sizes are Shapes' generated training sets (2,000 and 32,000 images, 1,600 test "
            "images). The finding holds if warm10 minus plain is larger on the large set.",
            [
                Variant(
                    f"{size}_{start}",
                    f"{count} training images, --warm-start {factor}",
                    {**SHAPES_SMALL_KERNEL, "--warm-start": factor, "--shapes-train": count},
                    at_scale={"small": {"--shapes-train": small_count}},
                )
                for size, count, small_count in (("small", "2000", "250"), ("large", "32000", "1000"))
                for start, factor in (("plain", "1"), ("warm10", "10"))
            ],
            {**SMALL_SHAPES, "--shapes-test": "400", "-ne": "2", "-lce": "2"},
        ),
    ]
}
