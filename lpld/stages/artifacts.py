"""Stage ``artifacts``: what exists under the artifacts folder for a dataset, its key values and whether it is
complete (``python run.py stage=artifacts dataset=cifar10_jpg``; ``stage.kind=images`` lists one kind).

Indexed artifacts (written since the index exists: :mod:`lpld.artifacts.catalog`) show the values behind their
keys; older ones are listed from the folder layout with "values unknown". Nothing is written.
"""

from __future__ import annotations

from typing import Any

from lpld.artifacts import catalog
from lpld.artifacts.base import dataset_name, root
from lpld.config.frozen import Experiment
from lpld.errors import ConfigError


def _values_line(values: dict[str, Any], kind: str) -> str:
    flat = catalog._flat(values)
    if not flat:
        return "values unknown (made before the artifact index; rerun its stage to index it)"
    return ", ".join(f"{catalog.config_key(kind, k)}={v}" for k, v in sorted(flat.items()))


def run(exp: Experiment) -> list[dict[str, Any]]:
    kind = exp.stage.get("kind")
    if kind is not None and str(kind) not in catalog.KINDS:
        raise ConfigError(f"stage.kind={kind!r} is not an artifact kind; choose one of {', '.join(catalog.KINDS)}")
    art, ds = root(exp), dataset_name(exp)
    refs = [r for r in catalog.listing(art, ds) if kind is None or r.kind == str(kind)]
    print(f"# artifacts of dataset {ds} under {art}: {len(refs)}")
    for r in refs:
        print(f"{r.kind:8s} {r.status:10s} {r.key}\n{'':20s}{r.path}\n{'':20s}{_values_line(r.values, r.kind)}")
    return [{"kind": r.kind, "key": r.key, "path": str(r.path), "status": r.status, "values": r.values} for r in refs]
