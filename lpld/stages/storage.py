"""Stage ``storage``: the storage accounting of a label store, or the prediction for a config.

``python run.py stage=storage stage.path=<store>`` prints the store's manifest accounting by
component next to the bytes on disk. Without a store (``stage.path`` null and no store for the
current config) it prints the predicted bytes of images and labels for the config, in this
project's layout and in the paper's convention (LPLD Table 24), e.g.
``python run.py stage=storage dataset=in1k ipc=10 prune=1x quant=none``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lpld.config.frozen import Experiment
from lpld.core.label_store import LabelStore, disk_bytes
from lpld.core.storage_accounting import GIB, format_table, image_bytes, predict_paper, predict_store


def _print_store(path: Path, verify: str) -> dict[str, Any]:
    store = LabelStore.open(path, verify=verify)
    man = store.manifest
    acc = man["accounting"]
    rows = sorted(acc["components"].items())
    print(format_table(rows + [("npy_headers", acc["npy_headers"])], f"label store {path}: {len(store)} batches"))
    on_disk = disk_bytes(path)
    img = (man.get("meta") or {}).get("image_bytes") or {}
    ratio = on_disk / acc["total"]
    print(f"labels on disk (all files): {on_disk:,d} B = {on_disk / GIB:.4f} GiB; disk / accounting {ratio:.4f}")
    if img:
        files = img.get("files", img.get("png_files", 0))  # png_files: stores written before issue 20
        print(f"images: stored files {files:,d} B, uint8 pixels {img.get('uint8_pixels', 0):,d} B")
        if files:
            print(f"label-to-image ratio (stored files): {on_disk / files:.2f}")
    return {"path": str(path), "components": acc["components"], "total": acc["total"], "disk_bytes": on_disk}


def run(exp: Experiment) -> dict[str, Any]:
    from lpld.artifacts import labels

    st = exp.stage
    if st.get("path"):
        return _print_store(Path(str(st.path)), str(st.verify))
    spec = labels.store_spec(exp)
    try:
        path = labels.path(exp)
    except Exception:  # noqa: BLE001 - no artifacts root configured: prediction only
        path = None
    if path is not None and (path / "manifest.json").exists():
        return _print_store(path, str(st.verify))
    acc = predict_store(spec)
    paper = predict_paper(
        spec.num_images,
        spec.num_classes,
        spec.epochs,
        spec.batch_size,
        spec.prune_ratio,
        spec.granularity,
        spec.aug.mix,
        drop_last=spec.drop_last,
    )
    img = image_bytes(
        spec.num_images, int(exp.dataset.channels), int(exp.dataset.image_size), st.get("image_bytes_per_image")
    )
    title = (
        f"predicted label store: {exp.dataset.name} ipc{exp.ipc} prune={spec.prune_name}-{spec.granularity} "
        f"quant={spec.quant.tag} record={spec.record_mode} ({acc['num_batches']} batches)"
    )
    print(format_table(sorted(acc["components"].items()) + [("npy_headers", acc["npy_headers"])], title))
    print(format_table(sorted(paper["components"].items()), "paper convention (LPLD Table 24, explicit fp32 records)"))
    print(f"images: {img:,d} B = {img / GIB:.4f} GiB")
    print(f"label-to-image ratio: {acc['on_disk_arrays'] / img:.1f} (this layout), {paper['total'] / img:.1f} (paper)")
    return {"predicted": acc, "paper": paper, "image_bytes": img}
