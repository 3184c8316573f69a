"""Follow the experiment through a stage: which lpld modules receive it, in call order (issue 18's measure).

A *stop* is a call of an lpld function with the frozen :class:`~lpld.config.frozen.Experiment` (the very object
dispatch made) among its arguments. From the stops, in order:

- *re-entries* of a module: a stop in a module already visited and left for another one;
- *climbs*: a stop whose caller sits in a lower layer than the callee (``core`` 0 < ``data`` / ``models`` /
  ``config`` / ``artifacts`` / ``report`` 1 < ``lit`` 2 < ``stages`` 3), i.e. a lower layer handing the experiment
  back up.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

LAYER = {"core": 0, "data": 1, "models": 1, "config": 1, "artifacts": 1, "report": 1, "errors": 1, "lit": 2}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "lpld":
        return -1
    if parts[1] == "stages":
        return 3
    return LAYER.get(parts[1], 1)


@dataclass
class Trace:
    stops: list[tuple[str, str, str]] = field(default_factory=list)  # (module, function, caller module)

    def modules(self) -> list[str]:
        return [m for m, _f, _c in self.stops]

    def reentries(self) -> Counter:
        seen: set[str] = set()
        out: Counter = Counter()
        prev = None
        for m in self.modules():
            if m != prev and m in seen:
                out[m] += 1
            seen.add(m)
            prev = m
        return out

    def climbs(self) -> list[tuple[str, str, str]]:
        return [(m, f, c) for m, f, c in self.stops if layer(c) >= 0 and layer(c) < layer(m)]


def follow(exp: Any, fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, Trace]:
    """Run ``fn(*args, **kwargs)`` and record every call of an lpld function that receives ``exp``."""
    trace = Trace()

    def prof(frame: Any, event: str, _arg: Any) -> None:
        if event != "call":
            return
        name = frame.f_globals.get("__name__", "")
        if not name.startswith("lpld.") or name == "lpld.config.frozen":
            return
        code = frame.f_code
        n = code.co_argcount + code.co_kwonlyargcount
        if any(frame.f_locals.get(v) is exp for v in code.co_varnames[:n]):
            caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
            trace.stops.append((name, code.co_name, caller))

    old = sys.getprofile()
    sys.setprofile(prof)
    try:
        out = fn(*args, **kwargs)
    finally:
        sys.setprofile(old)
    return out, trace
