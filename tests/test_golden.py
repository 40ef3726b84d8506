"""Refactors keep numbers: every golden fit is bit-identical (``==``) to what it recorded.

The cases and how to record them are in ``tests/golden/golden.py``; a Ray case runs on the
session's local cluster.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
import golden  # noqa: E402

RECORDED = json.loads(golden.GOLDEN.read_text())


def test_every_case_is_recorded():
    assert sorted(RECORDED) == sorted(c.__name__ for c in golden.CASES)


@pytest.mark.parametrize("case", golden.CASES, ids=lambda c: c.__name__)
def test_golden_fit_is_bit_identical(case, request):
    if case.__name__.startswith("ray_"):
        request.getfixturevalue("ray_cluster")
    got = golden.run(case)
    want = RECORDED[case.__name__]
    assert len(got["hist"]) == len(want["hist"]) and got["hist"] == want["hist"]
    assert got["params"] == want["params"]
