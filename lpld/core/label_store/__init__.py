"""The label store: fixed-layout, memory-mapped, checksummed soft labels of the relabel stage.

One directory per (images, teacher, augmentation, prune, quant, record mode, seed) holding

* ``manifest.json``: the spec (what was generated), fingerprints of images and teacher, the
  array table (file, dtype, shape, storage component, sha256, sampled sha256) and the storage
  accounting by component; ``complete`` is false until every kept batch is written;
* one ``.npy`` file per array (numpy's documented, pickle-free format, opened with
  ``mmap_mode="r"``), rows of all batches concatenated (ragged: a short last batch takes only
  its own rows, so no padding inflates the store), located by ``row_offsets``;
* during generation only: ``progress.<rank>.npy`` bitmaps of committed batches (resume).

Arrays (M stored batches, R = total rows = sum of their sizes):

==================  ============  ===========  ==============================================
array               shape         dtype        component
==================  ============  ===========  ==============================================
batch_ids           (M, 2)        int32        batch_index  (epoch, batch_in_epoch)
row_offsets         (M + 1,)      int64        batch_index
seeds               (M,)          uint64       seed         record_mode=seed only
sample_index        (R,)          uint16/32    sample_index explicit only (seed: regenerated)
crops               (R, 4)        uint16       crop_coords  explicit (top, left, h, w)
flips               (R,)          uint8        flips        explicit, aug.flip
mix_index           (R,)          uint8/16     mix_index    explicit, cutmix
lam                 (M,)          float32      lambda       explicit, cutmix
box                 (M, 4)        uint16       box          explicit, cutmix (y1, x1, y2, x2)
cutout              (R, 4)        uint16       cutout_box   explicit, cutout
cutout_rgb          (R, C_in)     uint8        cutout_fill  explicit, cutout, aug.cutout_fill=random
patch_perm          (R, 2, f)     uint8        patch_perm   explicit, aug.shuffle_patches=f (row, column order)
logits              (R, C)        float16      logits       quant=none
topk_values         (R, k)        float16      topk_values  quant=mr (logits) / ms (probs)
topk_indices        (R, k)        uint16/32    topk_indices quant=mr/ms
hard                (R,)          uint16/32    hard         quant=hard
==================  ============  ===========  ==============================================

The label arrays (the last four rows) are whatever the store's label codec declares (``lpld.core.quant``:
name, per-row shape, dtype, label or record storage); each is its own component in the accounting.

Record modes: ``explicit`` stores every augmentation parameter (the paper's accounting,
Table 21 components 1-5); ``seed`` stores one 64-bit seed per batch and regenerates the image
order and the parameters at read time with ``lpld.core.augment`` (bit-identical: same code,
same seed). Reading batch i costs O(1) array slices (seed mode: plus one cached permutation
per epoch).

checksums           (M, A)        uint32       checksum     CRC-32 of batch i's slice of each of the A
                                                            arrays written per batch (``checksummed``)

Integrity (format 2): every stored batch carries a CRC-32 per array it wrote, and ``LabelStore.read``
checks them on every read, so a flipped byte anywhere in the data stops training at the first read of
that batch, naming the batch, the file and the fix. ``LabelStore.open(verify="fast")`` checks every
file's size and npy header, hashes the small index arrays fully and the others over sampled 4 KiB
blocks; ``verify="full"`` (and ``LabelStore.verify``) hashes every byte (an audit). Format 1 stores
(no per-batch checksums) are refused with the command that regenerates them.

Writers: ``prepare`` takes the store's OS file lock (``lpld.core.io.acquire_lock``; a second writer is
refused with the holder's pid and host) and keeps it until ``finalize``; ``overwrite=True`` moves the
old store to ``<store>.replaced`` and deletes it only when the new store is finalized.


Modules: ``spec`` (StoreSpec, identity), ``layout`` (arrays and storage accounting), ``integrity`` (hashes),
``writer`` (prepare / StoreWriter / finalize), ``reader`` (LabelStore, StoredBatch), ``dataset``
(StoredBatchDataset). Every public name is re-exported here.
"""

from lpld.core.label_store.dataset import StoredBatchDataset
from lpld.core.label_store.integrity import (
    _SAMPLE_BLOCK,
    _SAMPLE_COUNT,
    corrupt_store_error,
    full_sha256,
    old_format_error,
    sampled_sha256,
)
from lpld.core.label_store.layout import (
    RESERVED_NAMES,
    ArraySpec,
    accounting,
    array_layout,
    batch_slices,
    checksummed,
    crc32s,
    npy_header_bytes,
    predicted_bytes,
    row_offsets,
)
from lpld.core.label_store.reader import LabelStore, StoredBatch, disk_bytes
from lpld.core.label_store.spec import (
    FORMAT,
    INDEX_ARRAYS,
    MANIFEST,
    RATIO_REFUSE,
    RATIO_WARN,
    RECORD_MODES,
    StoreSpec,
    achieved_ratio,
    identity,
    identity_diff,
    spec_achieved,
)
from lpld.core.label_store.writer import StoreWriter, done_bitmap, finalize, prepare

__all__ = [
    "ArraySpec",
    "FORMAT",
    "INDEX_ARRAYS",
    "LabelStore",
    "MANIFEST",
    "RATIO_REFUSE",
    "RATIO_WARN",
    "RECORD_MODES",
    "RESERVED_NAMES",
    "StoreSpec",
    "StoreWriter",
    "StoredBatch",
    "StoredBatchDataset",
    "_SAMPLE_BLOCK",
    "_SAMPLE_COUNT",
    "accounting",
    "achieved_ratio",
    "array_layout",
    "batch_slices",
    "checksummed",
    "corrupt_store_error",
    "crc32s",
    "disk_bytes",
    "done_bitmap",
    "finalize",
    "full_sha256",
    "identity",
    "identity_diff",
    "npy_header_bytes",
    "old_format_error",
    "predicted_bytes",
    "prepare",
    "row_offsets",
    "sampled_sha256",
    "spec_achieved",
]
