"""Byte-honest accounting of a results record (issue 21, item 1): everything a student needs at train time.

A row's bytes are four parts:

* ``images``: the distilled images as stored (``image_file_bytes``: the PNG files; ``image_bytes``, the raw uint8
  pixels, where a record has no file size);
* ``labels``: the label arrays the student reads (``label_only_bytes``; 0 for a hard-label student, whose labels
  are the images' classes, implied by their order: ``labels == "hard"``, or ``student.loss == "ce"`` in older
  records);
* ``records``: the augmentation records it replays (``label_bytes - label_only_bytes``: crops, flips, CutMix
  partners and boxes, or one seed per batch with ``relabel.record_mode=seed``, plus the store's index and checksums);
* ``model``: any network the student runs at train time (``model_bytes``: an online teacher, a label generator);
  0 for a student that reads stored labels.

``total`` is their sum. A record written before ``label_only_bytes`` existed cannot be split: its ``label_bytes``
count as labels and its records as 0 (the total is right either way).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PARTS = ("images", "labels", "records", "model")
# derived record fields (``lpld.report.table.get_field``): bytes_images, ..., bytes_total
FIELDS = tuple(f"bytes_{p}" for p in (*PARTS, "total"))


def is_hard(record: Mapping[str, Any]) -> bool:
    """The row's student trained on hard labels: ``labels == "hard"``, or (older records) ``student.loss == "ce"``."""
    if "labels" in record:
        return record["labels"] == "hard"
    student = record.get("student")
    if not isinstance(student, Mapping):
        student = (record.get("config") or {}).get("student") or {}
    return student.get("loss") == "ce"


# how a row's student got its labels (``label_kind``): its own family in the table and the plot
LABEL_KINDS = ("soft", "hard", "online", "generator")


def label_kind(record: Mapping[str, Any]) -> str:
    """``online`` (the teacher labelled each batch at train time), ``generator`` (a shipped label generator),
    ``hard`` (:func:`is_hard`) or ``soft`` (a stored soft-label store)."""
    kind = record.get("labels")
    if kind in ("online", "generator"):
        return str(kind)
    return "hard" if is_hard(record) else "soft"


def byte_parts(record: Mapping[str, Any]) -> dict[str, int]:
    """{images, labels, records, model, total} bytes of one record (see the module docstring).

    Raises:
        KeyError: the record has neither ``image_file_bytes`` nor ``image_bytes``, or no ``label_bytes``.
    """
    images = record.get("image_file_bytes")
    if images is None:
        images = record["image_bytes"]
    store = int(record["label_bytes"])  # the pooled batches' accounting total: label arrays + records
    label_arrays = record.get("label_only_bytes")
    label_arrays = store if label_arrays is None else int(label_arrays)
    parts = {
        "images": int(images),
        # a hard-label student reads no label array (a record written before issue 19 still counts the store's
        # label arrays in label_bytes and label_only_bytes: subtracting them leaves its records either way)
        "labels": 0 if is_hard(record) else label_arrays,
        "records": store - label_arrays,
        "model": int(record.get("model_bytes") or 0),
    }
    if min(parts.values()) < 0:
        raise ValueError(f"negative byte count in a results record: {parts} (label_only_bytes > label_bytes?)")
    parts["total"] = sum(parts.values())
    return parts


def seed_record_bytes(record: Mapping[str, Any]) -> int | None:
    """The row's record bytes had its store used ``relabel.record_mode=seed`` (issue 21: what replay saves).

    Seed mode keeps one uint64 seed per stored batch (plus the batch index and CRCs) and regenerates the image
    order and every augmentation parameter bit for bit (``lpld.core.augment``); its records depend only on the
    number of pooled batches M (``pool_batches``) and the store's spec (read from ``store_dir``/manifest.json).
    None when the record lacks them or the store is gone.
    """
    import dataclasses
    import json
    from pathlib import Path

    from lpld.core.label_store import StoreSpec, accounting, array_layout

    store_dir, m = record.get("store_dir"), record.get("pool_batches")
    man_path = Path(str(store_dir)) / "manifest.json" if store_dir else None
    if m is None or man_path is None or not man_path.is_file():
        return None
    man = json.loads(man_path.read_text())
    spec = StoreSpec.from_dict((man.get("identity") or {}).get("spec") or man)
    seed = dataclasses.replace(spec, record_mode="seed")
    return int(accounting(array_layout(seed, int(m), 1))["records_bytes"])  # no per-row record in seed mode


def derived_field(record: Mapping[str, Any], name: str) -> int:
    """The value of a derived ``bytes_<part>`` field (KeyError when the record lacks what it needs)."""
    if name not in FIELDS:
        raise KeyError(name)
    return byte_parts(record)[name[len("bytes_") :]]
