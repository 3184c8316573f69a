"""User errors on the command line: one message naming the key and the fix, exit 1, no traceback
(``LPLD_DEBUG=1`` / ``HYDRA_FULL_ERROR=1`` show it)."""

from __future__ import annotations

import pytest
from conftest import run_cli

cli = run_cli  # tests/conftest.py


@pytest.mark.parametrize("arg", ["ipc=abc", pytest.param("seed=2.5", marks=pytest.mark.slow)])
def test_type_error_in_an_override_is_one_line_naming_the_key(tmp_path, arg):
    r = cli(tmp_path, "stage=storage", arg)
    key = arg.split("=")[0]
    assert r.returncode == 1
    assert f"lpld error: {key}=" in r.stderr and f"{key}=<integer>" in r.stderr
    assert "Traceback" not in r.stderr and "Error executing job" not in r.stderr


@pytest.mark.slow
def test_debug_env_shows_the_traceback(tmp_path):
    r = cli(tmp_path, "stage=storage", "ipc=abc", LPLD_DEBUG="1")
    assert r.returncode == 1 and "Traceback" in r.stderr and "ipc='abc'" in r.stderr
