"""Which artifacts a run reads and writes, whether they exist, and the closest existing one when they do not.

Every artifact key is ``<readable prefix>_<8 hex>`` of its spec's values (:mod:`lpld.artifacts.base`); the hex
alone cannot say *why* a run does not find an artifact that is "obviously" there. So each stage that finishes
records the values behind every key it wrote in a small index beside the artifacts (never inside an
artifact's folder, so no artifact's bytes change)::

    <artifacts>/<dataset>/_index/<kind>/<key>.json      {"kind", "key", "path", "values"}

and :func:`closest` compares a missing artifact's values with the indexed ones of its kind, naming the
values that differ (``images exist with recover.iterations=5; this run asks 4000``).

    planned(exp) -> list[ArtifactRef]     the artifacts stage ``exp.stage.name`` reads (role "read") and writes
    record_written(exp)                   index what the stage wrote (called by the dispatcher after success)
    closest(ref, artifacts_root) -> Match | None
    listing(artifacts_root, dataset) -> list[ArtifactRef]   every indexed artifact (``stage=artifacts``)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpld.artifacts import images, labels, results, stats, students, teacher
from lpld.artifacts.base import EXCLUDED, dataset_name, get, plain, root, strip, under
from lpld.config.frozen import Experiment
from lpld.core.io import atomic_write_json

KINDS = ("teacher", "stats", "images", "labels", "student", "results")
INDEX = "_index"  # beside the teacher folders and results/ (a plain name: lpld.artifacts.base.under)

# spec field prefix -> the config key a user sets (for readable differences); first match wins
_CONFIG_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "teacher": (("model.", "model."), ("data.", "dataset."), ("teacher_seed", "teacher_seed")),
    "stats": (("", "stats."),),
    "images": (("settings.", "recover."), ("method", "recover"), ("ipc", "ipc"), ("seed", "seed")),
    "labels": (
        ("store.quant.", "quant."),
        ("store.prune.", "prune."),
        ("store.aug.", "relabel."),
        ("store.", "relabel."),
        ("precision", "relabel.precision"),
    ),
    "student": (("settings.", "student."), ("metric.", "metric."), ("model.", "student.arch:"), ("seed", "seed")),
    "results": (("name", "stage.results_name"),),
}


@dataclass(frozen=True)
class ArtifactRef:
    """One artifact a run touches.

    kind: teacher | stats | images | labels | student | results; role: read | write; status: complete |
    incomplete (an interrupted producer left it) | missing; values: the spec values its key signs.
    """

    kind: str
    role: str
    key: str
    path: Path
    status: str
    values: dict[str, Any] = field(default_factory=dict, compare=False)

    def line(self) -> str:
        return f"{self.role:5s} {self.kind:8s} {self.status:10s} {self.key}\n{'':26s}{self.path}"


@dataclass(frozen=True)
class Match:
    """The closest indexed artifact of a kind and how it differs: [(config key, theirs, ours)]."""

    key: str
    path: Path
    status: str
    diffs: list[tuple[str, Any, Any]]

    def describe(self, kind: str) -> str:
        if not self.diffs:
            return f"{kind} {self.key} exists with the same values ({self.status})"
        parts = "; ".join(f"{k}: exists with {theirs!r}, this run asks {ours!r}" for k, theirs, ours in self.diffs[:6])
        more = f" (+{len(self.diffs) - 6} more)" if len(self.diffs) > 6 else ""
        return f"closest existing {kind}: {self.key} ({self.status}) differs in {parts}{more}"


# ---------------------------------------------------------------------------------------------------- status
def status(kind: str, path: Path) -> str:
    """complete | incomplete | missing, from what the producer leaves on disk (no hashing: cheap)."""
    path = Path(path)
    if kind == "teacher":
        if path.is_file():
            return "complete"
        return "incomplete" if (path.parent / "last.ckpt").exists() else "missing"
    if kind in ("stats", "results"):
        return "complete" if path.is_file() else "missing"
    if kind in ("images", "labels"):
        man = path / ("manifest.json")
        if not man.is_file():
            return "incomplete" if path.is_dir() else "missing"
        try:
            return "complete" if json.loads(man.read_text()).get("complete", False) else "incomplete"
        except (OSError, ValueError):
            return "incomplete"
    if kind == "student":
        if (path / "final.json").is_file():
            return "complete"
        return "incomplete" if path.is_dir() else "missing"
    raise ValueError(f"unknown artifact kind {kind!r}")


def _ref(kind: str, role: str, spec: Any, path: Path) -> ArtifactRef:
    return ArtifactRef(kind, role, spec.key(), Path(path), status(kind, path), _values(spec))


def _values(spec: Any) -> dict[str, Any]:
    return strip(plain(dict(spec.__dict__)))


# ---------------------------------------------------------------------------------------------------- planned
def _teacher(exp: Experiment, role: str) -> ArtifactRef:
    sp = teacher.spec(exp)
    explicit = get(exp, "model.checkpoint")
    path = Path(str(explicit)).expanduser().resolve() if explicit else sp.path(root(exp))
    ref = _ref("teacher", role, sp, path)
    if get(exp, "model.pretrained", False) and not explicit and ref.status == "missing":
        return ArtifactRef("teacher", role, ref.key, path, "pretrained", ref.values)  # loaded from the hub/cache
    return ref


def _stats(exp: Experiment) -> ArtifactRef:
    sp = stats.spec(exp)
    return _ref("stats", "read" if str(exp.stage.name) != "stats" else "write", sp, sp.path(root(exp)))


def _images(exp: Experiment, role: str) -> ArtifactRef:
    sp = images.spec(exp)
    return _ref("images", role, sp, sp.path(root(exp)))


def _labels(exp: Experiment, role: str, store_cfg: Experiment | None = None) -> ArtifactRef:
    sp = labels.spec(store_cfg if store_cfg is not None else exp)
    return _ref("labels", role, sp, sp.path(root(exp)))


def _results(exp: Experiment) -> ArtifactRef:
    sp = results.spec(exp)
    return _ref("results", "write", sp, sp.path(root(exp)))


def _student(exp: Experiment, store: ArtifactRef, imgs: ArtifactRef) -> ArtifactRef | None:
    """The student run: its key depends on the store's schedule, so it is known once the store is complete."""
    if store.status != "complete" or imgs.status != "complete":
        return None
    from lpld.config import metric_settings, student_settings
    from lpld.config.precision import resolve_precision
    from lpld.config.student_run import student_model_cfg, world_size

    man = json.loads((store.path / "manifest.json").read_text())
    img_man = json.loads((imgs.path / "manifest.json").read_text())
    sp = students.spec(
        exp,
        store.path,
        model=student_model_cfg(exp),
        settings=student_settings(exp, man),
        metric=metric_settings(exp),
        images_fingerprint=img_man.get("images_fingerprint"),
        world=world_size(exp),
        precision=resolve_precision(exp.trainer, "student"),
    )
    return _ref("student", "write", sp, sp.path(root(exp)))


def planned(exp: Experiment) -> list[ArtifactRef]:
    """The artifacts stage ``exp.stage.name`` reads and writes (the pipeline: see ``lpld.stages.show``)."""
    from lpld.config import recover_methods

    name = str(exp.stage.name)
    if name == "squeeze":
        return [_teacher(exp, "write")]
    if name == "stats":
        return [_teacher(exp, "read"), _stats(exp)]
    if name == "recover":
        method = recover_methods()[str(exp.recover.name)]
        out = [_teacher(exp, "read")]
        if method.get("classwise") and not get(exp, "recover.stats_path"):
            out.append(_stats(exp))
        return [*out, _images(exp, "write")]
    if name == "relabel":
        return [_teacher(exp, "read"), _images(exp, "read"), _labels(exp, "write")]
    if name == "student":
        from lpld.config.student_run import store_config

        imgs = _images(exp, "read")
        store = _labels(exp, "read", store_config(exp))
        run = _student(exp, store, imgs)
        return [imgs, store, *([run] if run is not None else []), _results(exp)]
    if name == "storage":
        return [] if get(exp, "stage.path") else [_labels(exp, "read")]
    if name == "report":
        rn = get(exp, "stage.results_name")
        return [ArtifactRef("results", "read", r.key, r.path, r.status) for r in [_results(exp)]] if rn else []
    if name == "analyze":
        out = []
        for m in get(exp, "stage.methods", []) or []:
            out.append(_images(images.with_method(exp, str(m)), "read"))
        return out
    return []  # plan, show, artifacts: read nothing


# ---------------------------------------------------------------------------------------------------- index
def _index_file(artifacts: Path, dataset: str, kind: str, key: str) -> Path:
    return under(Path(artifacts), dataset, INDEX, kind, f"{key}.json")


def record(ref: ArtifactRef, artifacts: Path, dataset: str) -> None:
    """Index the values behind ``ref.key`` (idempotent; the key signs the values, so they never change)."""
    f = _index_file(artifacts, dataset, ref.kind, ref.key)
    if f.exists():
        return
    f.parent.mkdir(parents=True, exist_ok=True)
    rel = Path(ref.path).resolve()
    try:
        rel = rel.relative_to(Path(artifacts).resolve())
    except ValueError:  # an explicit path outside the artifacts folder (model.checkpoint, stage.store)
        pass
    atomic_write_json(f, {"kind": ref.kind, "key": ref.key, "path": str(rel), "values": ref.values})


def record_written(exp: Experiment) -> None:
    """After a stage finished: index every artifact it wrote (best effort: an index failure never fails a run)."""
    import logging

    try:
        refs = [r for r in planned(exp) if r.role == "write" and r.kind != "results"]
        for r in refs:
            if r.status == "complete":
                record(r, root(exp), dataset_name(exp))
    except Exception as e:  # noqa: BLE001 - the index only serves messages; the artifacts themselves are written
        logging.getLogger("lpld").debug("artifact index not updated: %s", e)


def _indexed(artifacts: Path, dataset: str, kind: str) -> list[dict[str, Any]]:
    folder = under(Path(artifacts), dataset, INDEX, kind)
    out = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return out


def _abs(artifacts: Path, p: str) -> Path:
    """An indexed path: relative ones are joined below the root (only probed for existence, never opened)."""
    q = Path(p)
    return q if q.is_absolute() else under(Path(artifacts), *q.parts)


# where each kind lives below <artifacts>/<dataset>/<teacher key>/ (lpld.artifacts.<kind>.path)
_LAYOUT = {
    "teacher": "teacher/teacher.pt",
    "stats": "stats/*.pt",
    "images": "images/*",
    "labels": "labels/*/*",
    "student": "students/*/*/*",
}


def _on_disk(artifacts: Path, dataset: str) -> list[tuple[str, Path]]:
    """(kind, path) of every artifact folder/file in the layout, indexed or not."""
    base = Path(artifacts) / dataset
    out = []
    for tdir in sorted(p for p in base.iterdir() if p.is_dir() and p.name not in (INDEX, "results")):
        for kind, pattern in _LAYOUT.items():
            for p in sorted(tdir.glob(pattern)):
                if ".replaced" in p.name or p.name.startswith(".") or p.name.endswith(".lock"):
                    continue
                if kind in ("images", "labels", "student") and not p.is_dir():
                    continue
                out.append((kind, p))
    return out


def listing(artifacts: Path, dataset: str) -> list[ArtifactRef]:
    """Every artifact of ``dataset`` with its status now (``stage=artifacts``): the indexed ones with the values
    behind their keys, then any made before the index (values unknown) found in the layout."""
    out, seen = [], set()
    for kind in KINDS:
        for e in _indexed(artifacts, dataset, kind):
            p = _abs(artifacts, e["path"])
            seen.add(str(p))
            out.append(ArtifactRef(kind, "", e["key"], p, status(kind, p), e.get("values", {})))
    if (Path(artifacts) / dataset).is_dir():
        for kind, p in _on_disk(artifacts, dataset):
            if str(p) not in seen:
                key = p.parent.parent.name if kind == "teacher" else p.stem if kind == "stats" else p.name
                out.append(ArtifactRef(kind, "", key, p, status(kind, p), {}))
    return out


# ---------------------------------------------------------------------------------------------------- closest
def missing_hint(exp: Experiment, kind: str, spec: Any) -> str:
    """For a "no <artifact> at ..." error: ``"; closest existing <kind>: <key> ... differs in <key>: ..."`` naming
    the values to set to use an artifact that exists, or "" when none of that kind is indexed (never raises)."""
    try:
        ref = ArtifactRef(kind, "read", spec.key(), Path("."), "missing", _values(spec))
        m = closest(ref, root(exp), dataset_name(exp))
    except Exception:  # noqa: BLE001 - a hint must never replace the error it decorates
        return ""
    if m is None or not m.diffs:
        return ""
    return f"; {m.describe(kind)} (set those values to use it)"


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if k in EXCLUDED:
                continue
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_key(kind: str, field_path: str) -> str:
    """The config key a user sets for a spec field (``settings.iterations`` of images -> ``recover.iterations``)."""
    for prefix, repl in _CONFIG_KEYS.get(kind, ()):
        if field_path == prefix or (prefix.endswith(".") and field_path.startswith(prefix)) or prefix == "":
            if repl.endswith(".") or repl.endswith(":"):
                return repl.rstrip(":") + ("." if repl.endswith(":") else "") + field_path[len(prefix) :]
            return repl
    return f"{kind}.{field_path}"


def diff(kind: str, theirs: dict[str, Any], ours: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The values that differ, as (config key, theirs, ours), in a stable order."""
    a, b = _flat(theirs), _flat(ours)
    keys = sorted(set(a) | set(b))
    return [(config_key(kind, k), a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def closest(ref: ArtifactRef, artifacts: Path, dataset: str) -> Match | None:
    """The indexed artifact of ``ref.kind`` whose values differ from ``ref.values`` in the fewest fields
    (complete ones preferred on ties); None when none of that kind is indexed."""
    best: tuple[int, int, Match] | None = None
    for e in _indexed(artifacts, dataset, ref.kind):
        if e["key"] == ref.key:
            continue
        p = _abs(artifacts, e["path"])
        st = status(ref.kind, p)
        if st == "missing":
            continue
        d = diff(ref.kind, e.get("values", {}), ref.values)
        rank = (len(d), 0 if st == "complete" else 1)
        if best is None or rank < best[:2]:
            best = (*rank, Match(e["key"], p, st, d))
    return None if best is None else best[2]
