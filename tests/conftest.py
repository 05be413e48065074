"""Shared fixtures: the repository, running its command line, the real data samples that live
beside the checkout, and finished runs that several test files start from.

The helpers behind them are defined once, in ``main_cli.py``: module-level tables and
parametrize lists (which no fixture reaches) import them from there.
"""

import inspect
import os
import signal
import subprocess
import types
from collections.abc import Callable
from pathlib import Path

import main_cli
import pytest
from main_cli import ROOT, TINY, run

SHARED_DATA = ROOT.parent / "shared" / "data"
# onnxruntime writes telemetry under HOME and TMPDIR as soon as it is imported, which the export
# tests do in this process; inference/export.py turns it off the same way for the tool.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The root of the checkout (where ``main.py`` and ``README.md`` are)."""
    return ROOT


@pytest.fixture(scope="session")
def tiny_shapes() -> tuple[str, ...]:
    """Flags for a Shapes run small enough to take seconds (``main_cli.TINY``, as a tuple: one
    object for the whole session, which no test can change for the next)."""
    return tuple(TINY)


#: What starts another process (``python main.py``, torchrun, the experiments' command line,
#: tools/gpu_check.sh): a test whose code, or its fixtures' code, refers to one of these, itself
#: or through functions of its module, is marked ``slow``.
SPAWNERS = (subprocess, main_cli.run, main_cli.start, main_cli.run_case)


def _spawns(function: Callable) -> bool:
    """Whether ``function`` (a test or a fixture) starts another process, through the functions
    of its own module that it calls (``SPAWNERS``)."""
    module = inspect.getmodule(function)
    todo, seen = [function.__code__], set()
    while todo:
        code = todo.pop()
        if code in seen:
            continue
        seen.add(code)
        todo += [const for const in code.co_consts if isinstance(const, types.CodeType)]
        for name in code.co_names:
            target = getattr(module, name, None)
            if any(target is spawner for spawner in SPAWNERS):
                return True
            if inspect.isfunction(target) and target.__module__ == module.__name__:
                todo.append(target.__code__)
    return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``slow`` every test that starts another process: ``pytest -m "not slow"`` is the
    everyday loop, in process only."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        functions = [getattr(item, "function", None)] + [
            definition.func for defs in (fixtures.name2fixturedefs.values() if fixtures else ()) for definition in defs
        ]
        if any(function is not None and _spawns(function) for function in functions):
            item.add_marker(pytest.mark.slow)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@pytest.fixture(autouse=True)
def no_leaked_signal_handlers():
    """Every test leaves SIGINT and SIGTERM handled as it found them: a handler left behind (the
    tool's ``StopSignals``, say) would turn a later Ctrl-C or SIGTERM into another test's failure.
    The one that leaks is failed, naming the handler, and the handlers are put back."""
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    after = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    leaked = {signum: handler for signum, handler in after.items() if handler is not before[signum]}
    for signum in leaked:
        signal.signal(signum, before[signum])
    if leaked:
        what = "; ".join(
            f"{signal.Signals(s).name} handled by {handler!r} instead of {before[s]!r}" for s, handler in leaked.items()
        )
        pytest.fail(f"the test left {what}; put back the handlers it installs (own_signals)")


@pytest.fixture
def own_signals():
    """For a test that installs SIGINT or SIGTERM handlers on purpose: they are put back after
    it (``main.main`` puts back its own)."""
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def run_main() -> Callable[..., object]:
    """``run_main(*args, cwd=..., env=None, timeout=600, prefix=None, preexec=None)``: run
    ``python main.py *args`` in ``cwd`` and return the ``CompletedProcess``, output captured
    as text (``main_cli.run``)."""
    return run


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (real CIFAR-100 and VOC samples); the test is skipped without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def earlier(tmp_path_factory, run_main) -> Path:
    """A folder holding a finished earlier run (TorchAlexNet on tiny Shapes, with its log), for
    the catalogue rows to prove they leave it untouched. Copy it (``main_cli.run_case``) before
    running anything in it."""
    root = tmp_path_factory.mktemp("earlier")
    result = run_main("-ne", "1", "--shapes-train", "16", "--shapes-test", "8", "--batch-size", "16", "-l", cwd=root)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="session")
def cifar_run(tmp_path_factory, run_main, tiny_shapes) -> Path:
    """A finished two-epoch CifarAlexNet run on tiny Shapes (its folder). Copy it
    (``main_cli.copy_run``) before running anything in it."""
    root = tmp_path_factory.mktemp("cifar_run")
    result = run_main("-c", "-ne", "2", "--seed", "1", *tiny_shapes, cwd=root)
    assert result.returncode == 0, result.stderr
    return root
