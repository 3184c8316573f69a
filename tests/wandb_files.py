"""Read what W&B wrote offline: the records of ``run-<id>.wandb`` (the files a user syncs later).

wandb >= 0.2x writes no ``files/config.yaml`` in offline mode; the run's config, summary and history live in
the ``.wandb`` file: a 7-byte header (``:W&B``, magic 0xBEE1, version) then LevelDB's log format (32 KiB
blocks; each chunk = crc32 (4) + length (2, LE) + type (1: full, 2: first, 3: middle, 4: last)) whose
payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, buf = [], HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - (pos % BLOCK)
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def run_view(run_dir: Path) -> dict[str, Any]:
    """{name, group, job_type, config, summary, history: [rows]} of one offline run folder."""
    f = next(Path(run_dir).glob("run-*.wandb"))
    view: dict[str, Any] = {"config": {}, "summary": {}, "history": []}
    for r in records(f):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            view.update(name=r.run.display_name, group=r.run.run_group, job_type=r.run.job_type)
            for it in r.run.config.update:
                view["config"][it.key] = json.loads(it.value_json)
        elif kind == "config":
            for it in r.config.update:
                view["config"][it.key] = json.loads(it.value_json)
        elif kind == "summary":
            for it in r.summary.update:
                view["summary"][it.key or ".".join(it.nested_key)] = json.loads(it.value_json)
        elif kind == "history":
            view["history"].append(
                {it.key or ".".join(it.nested_key): json.loads(it.value_json) for it in r.history.item}
            )
    view["config"].pop("_wandb", None)
    return view
