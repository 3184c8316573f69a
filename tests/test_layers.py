"""Layering (issue 13): ``lpld.core`` is plain PyTorch and imports nothing else from lpld; the subpackages form
no import cycle, with ``lit`` below ``stages``."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

LPLD = Path(__file__).resolve().parents[1] / "lpld"


def test_importing_all_of_core_pulls_in_no_other_lpld_package_nor_lightning_or_hydra():
    code = (
        "import sys, pkgutil, importlib, lpld.core\n"
        "for m in pkgutil.walk_packages(lpld.core.__path__, 'lpld.core.'): importlib.import_module(m.name)\n"
        "print(sorted({k.split('.')[1] for k in sys.modules if k.startswith('lpld.')}))\n"
        "print([m for m in ('lightning', 'hydra', 'omegaconf') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "['core']" and out[1] == "[]", out


def _edges() -> dict[str, set[str]]:
    """subpackage -> the lpld subpackages it imports (module level or inside functions)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for p in LPLD.rglob("*.py"):
        rel = p.relative_to(LPLD).with_suffix("").parts
        if len(rel) == 1 and rel[0] == "__init__":
            continue
        sub = rel[0]
        for node in ast.walk(ast.parse(p.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for n in names:
                parts = n.split(".")
                if parts[0] == "lpld" and len(parts) > 1 and parts[1] != sub:
                    edges[sub].add(parts[1])
    return edges


def test_no_import_cycle_between_subpackages_and_lit_below_stages():
    edges = _edges()
    assert not edges.get("core"), edges.get("core")
    assert "stages" not in edges.get("lit", set()) and "stages" not in edges.get("models", set())

    def reach(a: str, seen: set[str]) -> set[str]:
        for b in edges.get(a, ()):
            if b not in seen:
                seen.add(b)
                reach(b, seen)
        return seen

    cycles = sorted(a for a in edges if a in reach(a, set()))
    assert not cycles, {a: sorted(edges[a]) for a in cycles}
