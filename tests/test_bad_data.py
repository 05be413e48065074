"""Bad data through the command line: every data row of the bad-input table (``bad_data.CASES``:
CIFAR and VOC files, crafted files, image folders, ImageNet layouts) gives its one sentence and
a non-zero exit, with no traceback, in a folder whose earlier run stays untouched."""

import pytest
from bad_data import CASES
from main_cli import run_case


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_data_is_one_sentence(tmp_path, earlier, case):
    run_case(case, tmp_path, earlier)
