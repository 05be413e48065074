"""The original v2 tool's findings as reproducible experiments: presets, a resumable runner and a report.

python -m experiments list                                      # the presets and what each tests
python -m experiments run warm_start --seeds 3                  # CIFAR-10, three seeds, resumable
python -m experiments run all --scale small --data-dir ../shared/data
python -m experiments report runs/experiments/full --out report # Markdown table + PNG curves

Each preset compares a few variants of ``main.py`` with every flag spelled out; the runner
starts each (variant, seed) as its own ``main.py`` process, so a sweep is exactly the commands
a user could type. The report reads any runs' ``summary.json`` and TensorBoard scalars.
"""


class ExperimentError(Exception):
    """A mistake the user can fix (unknown preset, clashing output folder, no runs found); the
    command line reports it as one sentence and a non-zero exit."""
