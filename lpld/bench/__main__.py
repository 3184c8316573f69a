"""Run every benchmark module and write bench/results.json.

``--device cuda`` runs the GPU suite (``lpld/bench/_cuda.py``) instead and writes bench/results-cuda.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path

import lpld.bench as pkg

TARGETS = {  # key -> (comparison, target) from the issues
    "stats_over_forward": ("<=", 1.3),
    "recover_over_fwdbwd": ("<=", 1.25),
    "relabel_over_forward": ("<=", 1.5),
    "disk_over_accounting": ("<=", 1.02),
    "mr10_over_labels": ("<=", 1.01),
    "student_over_fwdbwd": ("<=", 1.3),
    "squeeze_over_fwdbwd": ("<=", 1.3),  # issue 19: the teacher's training adds no more than the student's
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    ap.add_argument("--only", nargs="*", help="module names to run (default: all)")
    ap.add_argument("--out", default=None, help="default: bench/results.json (cpu), bench/results-cuda.json (cuda)")
    ap.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the GPU suite (lpld/bench/_cuda.py)"
    )
    args = ap.parse_args(argv)
    if args.device == "cuda":
        return _main_cuda(args)
    args.out = args.out or "bench/results.json"
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    if args.only:
        names = [n for n in names if n in args.only]
    results: dict[str, float] = {}
    failed = []
    for name in names:
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"lpld.bench.{name}")
            res = mod.run(quick=args.quick)
        except Exception:  # noqa: BLE001 - report and continue with the other benchmarks
            traceback.print_exc()
            failed.append(name)
            continue
        results.update(res)
        print(f"[bench] {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    missed = _print_table(results, TARGETS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() and args.only else {}
    old.update(results)
    out.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    print(f"\nwritten {out}")
    return _exit_code(failed, missed)


def _exit_code(failed: list[str], missed: list[str]) -> int:
    """1 when a benchmark module failed or a target was missed (a missed target must fail CI / the GPU check)."""
    if failed:
        print(f"benchmark modules failed: {', '.join(failed)}", file=sys.stderr)
    if missed:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
    return 1 if failed or missed else 0


def _print_table(results: dict[str, float], targets: dict[str, tuple[str, float]]) -> list[str]:
    """Print every result beside its target; return the keys whose target was missed."""
    print(f"\n{'key':40s} {'value':>12s}  target")
    missed = []
    for k, v in results.items():
        tgt = targets.get(k)
        mark = ""
        if tgt:
            ok = v <= tgt[1] if tgt[0] == "<=" else v >= tgt[1]
            mark = f"{tgt[0]} {tgt[1]}  {'ok' if ok else 'MISSED'}"
            missed += [] if ok else [k]
        print(f"{k:40s} {v:12.4g}  {mark}")
    return missed


def _main_cuda(args: argparse.Namespace) -> int:
    """The GPU suite; without a CUDA device it stops at once (exit 2) with one message."""
    import torch

    if not torch.cuda.is_available():
        print(
            "lpld.bench --device cuda needs a CUDA GPU, and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine, "
            "or run the CPU suite with `python -m lpld.bench`",
            file=sys.stderr,
        )
        return 2
    from lpld.bench import _cuda

    print(f"[bench-cuda] {torch.cuda.get_device_name(0)}, torch {torch.__version__}", file=sys.stderr)
    results = _cuda.run("cuda", quick=args.quick)
    missed = _print_table(results, _cuda.TARGETS)
    out = Path(args.out or "bench/results-cuda.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results["device_name"] = torch.cuda.get_device_name(0)  # type: ignore[assignment]
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"\nwritten {out}")
    return _exit_code([], missed)


if __name__ == "__main__":
    sys.exit(main())
