"""Every reliability case runs with a sentinel outside its folders: nothing outside the artifacts folder is touched.

Each test builds its artifacts under its own ``tmp_path`` (``paths.root``); the fixture puts a sentinel file in a
sibling folder and checks afterwards that its bytes are unchanged and that no new entry appeared at the top of the
repository (an ``artifacts/`` or ``logs/`` written into the current directory instead of the configured one).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# written by the test runner itself, not by lpld
_RUNNER = {".pytest_cache", "__pycache__", ".coverage"}


@pytest.fixture(autouse=True)
def nothing_outside_the_artifacts_folder(tmp_path: Path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir(exist_ok=True)
    sentinel = outside / "sentinel.bin"
    sentinel.write_bytes(bytes(range(256)) * 4)
    digest = hashlib.sha256(sentinel.read_bytes()).hexdigest()
    top = {p.name for p in REPO.iterdir()}
    yield
    assert sentinel.exists() and hashlib.sha256(sentinel.read_bytes()).hexdigest() == digest, "sentinel changed"
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel.bin"], f"files appeared in {outside}"
    new = {p.name for p in REPO.iterdir()} - top - _RUNNER
    assert not new, f"the test wrote {sorted(new)} at the top of the repository, outside its artifacts folder"
