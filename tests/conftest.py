"""No test leaves a process behind: whatever a test started (``procs.start``) is killed, with its
whole process group, when the test ends — passed, failed or timed out."""

from __future__ import annotations

import pytest

import procs


@pytest.fixture(autouse=True)
def _kill_what_the_test_started():
    yield
    procs.kill_started()
