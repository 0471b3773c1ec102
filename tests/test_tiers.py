"""The fast tier (tests not marked slow) starts no process: conftest's guard holds it."""

import subprocess
import sys

import pytest


def test_a_fast_test_that_starts_a_process_fails():
    with pytest.raises(AssertionError, match="not marked slow"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    import multiprocessing
    with pytest.raises(AssertionError, match="not marked slow"):
        multiprocessing.get_context("spawn").Process(target=print).start()


@pytest.mark.slow
def test_a_slow_test_may_start_one():
    assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout == "42\n"
