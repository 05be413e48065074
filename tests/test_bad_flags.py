"""Bad command lines: every flag row of the bad-input table (``bad_flags.CASES``: values out of
range, combinations that do not fit, run names and output folders that cannot be used) gives its
one sentence and a non-zero exit, with no traceback, in a folder whose earlier run stays
untouched."""

import pytest
from bad_flags import CASES
from main_cli import run_case


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_flag_is_one_sentence(tmp_path, earlier, case):
    run_case(case, tmp_path, earlier)
