"""Running the real command line from tests: ``python main.py ...`` in a given folder.

The one definition of each shared helper. Tests take them as the fixtures of ``conftest.py``
(``repo_root``, ``tiny_shapes``, ``run_main``); module-level tables and parametrize lists,
where a fixture cannot reach, import them from here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Flags for a Shapes run small enough to take seconds.
TINY = ["--shapes-train", "120", "--shapes-test", "40", "--batch-size", "40"]
#: Flags for a one-epoch dry run on the small VOC folder ``data/PascalVOC2012`` (``fakedata.small_voc``).
VOC_DRY_RUN = [
    "-ds",
    "PascalVOC2012",
    "--data-dir",
    "data",
    "-ne",
    "1",
    "-d",
    "--cache-dir",
    "cache",
    "--batch-size",
    "2",
]


def command(*args: str) -> list[str]:
    """The argv of ``python main.py *args``."""
    return [sys.executable, str(ROOT / "main.py"), *args]


def run(
    *args: str,
    cwd: Path,
    prefix: list[str] | None = None,
    preexec: Callable | None = None,
    timeout: int | None = 600,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``python main.py *args`` in ``cwd`` (behind ``prefix``, e.g. setpriv; in ``env``, else
    this process's environment), output captured."""
    return subprocess.run(
        [*(prefix or []), *command(*args)],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
        env=env,
    )


def start(
    flags: list[str], cwd: Path, new_session: bool = False, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``python main.py *flags`` started in ``cwd``, its stderr a text pipe (``wait_for``), its
    stdout discarded; with ``new_session``, in a process group of its own (``os.killpg``); ``env``
    replaces the environment where given."""
    return subprocess.Popen(
        command(*flags),
        cwd=cwd,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=new_session,
        env=env,
    )


def wait_for(process: subprocess.Popen, text: str) -> str:
    """Read ``process``'s stderr up to the first line holding ``text``; what it read."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never appeared:\n{''.join(seen)}")


def only(path: Path, pattern: str) -> Path:
    """The one file under ``path`` matching ``pattern`` (fails when there are none or several)."""
    (match,) = path.glob(pattern)
    return match


def copy_run(source: Path, to: Path) -> Path:
    """A hard-linked copy of a run folder (checkpoints are replaced, never written in place);
    the copy's last.pt."""
    shutil.copytree(source, to, copy_function=os.link)
    return only(to / "checkpoints" / "Shapes", "*/last.pt")


def snapshot(root: Path) -> dict[Path, tuple[int, int, int]]:
    """Size, modification time and inode of every file: a rewrite or replacement changes one."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[p] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def unchanged(root: Path, before: dict[Path, tuple[int, int, int]]) -> bool:
    """Whether every file of ``before`` is still there, neither rewritten nor replaced."""
    after = snapshot(root)
    return all(after.get(p) == stat for p, stat in before.items())


# ---------------------------------------------------------------------------------------------
# The bad-input catalogue: one row of the bad-input table (docs/troubleshooting.md) per case. The
# rows live with their subject, in bad_data.py, bad_checkpoints.py and bad_flags.py.


@dataclass
class Case:
    """One row: prepare the inputs, run the flags, expect this exit code and sentence.

    ``flags`` may name ``EARLIER`` (the earlier run's last.pt) and ``EARLIER_RUN`` (its run name);
    ``prepare(work, earlier)`` builds
    the bad input inside ``work``; ``check(work, result)`` asserts anything more.
    """

    name: str
    flags: list[str]
    code: int
    message: str
    prepare: Callable[[Path, Path], None] = lambda work, earlier: None
    prefix: Callable[[], list[str]] = list
    preexec: Callable | None = None
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None
    restore: list[str] = field(default_factory=lambda: ["data", "readonly"])  # made unreadable by prepare


def without_file_permission_override() -> list[str]:
    """A command prefix under which file permissions apply: root normally ignores them (the test
    is skipped as root without ``setpriv``)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder unreadable")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def isolated(case: Case) -> Case:
    """``case`` run with HOME and TMPDIR in fresh folders of the work folder, checked empty after:
    nothing is written outside the folders the command is given."""
    prepare, prefix, check = case.prepare, case.prefix, case.check

    def prepare_too(work: Path, earlier: Path) -> None:
        (work / "home").mkdir()
        (work / "tmpdir").mkdir()
        prepare(work, earlier)

    def check_too(work: Path, result: subprocess.CompletedProcess) -> None:
        assert [*(work / "home").iterdir(), *(work / "tmpdir").iterdir()] == []
        if check is not None:
            check(work, result)

    case.prepare, case.check = prepare_too, check_too
    case.prefix = lambda: ["env", "HOME=home", "TMPDIR=tmpdir", *prefix()]
    return case


def earlier_checkpoint(earlier: Path) -> Path:
    """The last.pt of the earlier run in ``earlier`` (a copy of the session's earlier run)."""
    return only(earlier / "checkpoints" / "Shapes", "*/last.pt")


def run_case(case: Case, tmp_path: Path, earlier: Path) -> subprocess.CompletedProcess:
    """Run one catalogue row in a copy of the folder holding the earlier run and check what
    every row must hold: the exit code, exactly one error line matching the sentence, no
    traceback, the earlier run's files untouched, no crafted side effect, no temporary files,
    nothing written outside ``work``."""
    work = tmp_path / "work"
    # Hard links: the earlier run's checkpoints are hundreds of MB, and a changed file would show
    # in the snapshot all the same (os.replace gives a new inode, writing in place a new mtime).
    shutil.copytree(earlier, work, copy_function=os.link)
    before = snapshot(work)
    outside = {p for p in tmp_path.iterdir() if p != work}
    case.prepare(work, earlier)
    last = earlier_checkpoint(work)
    flags = [str(last) if f == "EARLIER" else f.replace("EARLIER_RUN", last.parent.name) for f in case.flags]
    try:
        result = run(*flags, cwd=work, prefix=case.prefix(), preexec=case.preexec)
    finally:
        for name in case.restore:
            if (work / name).exists():
                os.chmod(work / name, 0o755)
    assert result.returncode == case.code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(lines) == 1, result.stderr
    assert re.search(case.message, lines[0]), lines[0]
    assert unchanged(work, before)
    assert not (work / "pwned").exists()
    assert [p for p in work.rglob("*.tmp")] == []
    assert {p for p in tmp_path.iterdir() if p != work} == outside, "something was written beside the work folder"
    if case.check is not None:
        case.check(work, result)
    return result
