"""Bad checkpoints through the command line: every checkpoint row of the bad-input table
(``bad_checkpoints.CASES``: missing, damaged, crafted or foreign checkpoints, and run folders
that cannot take one) gives its one sentence and a non-zero exit, with no traceback, in a folder
whose earlier run stays untouched."""

import pytest
from bad_checkpoints import CASES
from main_cli import run_case


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_checkpoint_is_one_sentence(tmp_path, earlier, case):
    run_case(case, tmp_path, earlier)
    if case.name == "checkpoint naming a run outside its folder":
        assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()
