"""Convert a *trusted* legacy checkpoint into a weights-only file lpld can load safely.

    python -m lpld.models.convert_checkpoint IN OUT [--trust]

``OUT`` ending in ``.safetensors`` is written with safetensors (recommended); any other suffix gets a plain
``torch.save`` of the tensor state dict, which the weights-only loader reads. Without ``--trust`` the input is
read weights-only (a safe re-save, e.g. to strip a Lightning checkpoint down to its weights); with ``--trust``
the full unpickler is used, which runs whatever code the file contains: only pass it for files you made or
trust. This is the one place in lpld that can unpickle arbitrary objects, and only on this explicit request.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lpld.models.checkpoint import ModelCheckpointError, extract_state_dict, load_weights_file


def convert(src: str | Path, dst: str | Path, trust: bool = False) -> int:
    """Write the tensor state dict of ``src`` to ``dst``; return the number of tensors written."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_file():
        raise ModelCheckpointError(f"{src} does not exist; pass the path of the checkpoint to convert")
    if dst.resolve() == src.resolve():
        raise ModelCheckpointError(f"output {dst} is the input file; choose another OUT path")
    if trust:
        obj = torch.load(src, map_location="cpu", weights_only=False)  # explicit opt-in, see module docstring
    else:
        obj = load_weights_file(src)
    state = {k: v.detach().contiguous() for k, v in extract_state_dict(obj, src).items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    if dst.suffix == ".safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors that share storage; clone them apart (weights are tied in a few models)
        save_file({k: v.clone() for k, v in state.items()}, str(tmp))
    else:
        torch.save(state, tmp)
    tmp.replace(dst)
    return len(state)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lpld.models.convert_checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="checkpoint to convert")
    ap.add_argument("dst", help="output weights file (.safetensors recommended)")
    ap.add_argument(
        "--trust", action="store_true", help="use the full unpickler (runs code in the file): trusted files only"
    )
    args = ap.parse_args(argv)
    try:
        n = convert(args.src, args.dst, trust=args.trust)
    except ModelCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors to {args.dst}; use it with model.checkpoint={args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
