"""Every ``python run.py ...`` command of the README composes, resolves and describes itself (issue 19).

Each command is run in process with ``show=true`` appended: the config must compose (no unknown key, no bad
value), the experiment must resolve and every artifact it would read or write must be listed, without doing the
work. The cheap stages (plan, storage, show) also run for real. Sweep commands (``-cd sweeps -cn NAME``) are
covered by tests/test_sweeps.py and tests/test_artifact_keys.py; placeholders (``<...>``, ``...``, ``NAME``) are
skipped; a multirun (``-m``) takes the first value of each swept key; ``hydra/...`` launcher overrides need the
``[slurm]`` extra and only choose where jobs run, so they are dropped.
"""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import REPO, compose_cfg

from lpld.stages import run_stage

CHEAP = ("plan", "storage", "show", "artifacts")  # run for real: they only read or print


def readme_commands() -> list[str]:
    """The README's ``python run.py`` commands (code blocks with ``\\`` continuations, and inline code)."""
    text = REPO.joinpath("README.md").read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # join continued lines
    found = re.findall(r"(?:\.venv/bin/)?python run\.py(?:[^`\n#|]*)", text)
    out = []
    for c in found:
        c = c.strip()
        if any(t in c for t in ("<", "...", "NAME", "-cd ")):
            continue
        out.append(c)
    return sorted(set(out))


def overrides_of(command: str) -> list[str]:
    args = shlex.split(command)[2:]
    out = []
    for a in args:
        if a == "-m" or a.startswith("hydra/") or a.startswith("hydra."):  # where jobs run, not what they are
            continue
        key, _, value = a.partition("=")
        if "," in value and not value.startswith("["):  # a multirun sweep: its first value
            value = value.split(",")[0]
        out.append(f"{key}={value}" if _ else a)
    return out


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_composes_resolves_and_shows_its_artifacts(command, tmp_path, capsys):
    over = [*overrides_of(command), f"paths.root={tmp_path}", "logger=none"]
    if any(o.startswith("dataset=imagefolder") for o in over) and not any("num_classes" in o for o in over):
        over.append("dataset.num_classes=10")
    cfg = compose_cfg(over)
    stage = str(cfg.stage.name)
    if stage in CHEAP:
        run_stage(cfg)
    else:
        out = run_stage(compose_cfg([*over, "show=true"]))
        assert out["config"]["stage"]["name"] == stage
        assert out["artifacts"] or stage in ("report", "analyze"), out
    capsys.readouterr()
