"""Loading a local weight file (``model.checkpoint=PATH``) into a registry model.

Accepted files:
    * ``.safetensors`` (no code can run while reading it);
    * a ``torch.save`` file that the weights-only loader accepts: a raw state dict ``{param_name: Tensor}``,
      or a dict holding it under ``"state_dict"`` (Lightning ``.ckpt`` with plain hyper-parameters) or ``"model"``.

Security stance: a pickle can run arbitrary code while it is read, and users download teachers. lpld therefore
never unpickles arbitrary objects (no ``weights_only=False`` fallback anywhere). A file the weights-only loader
refuses (a pickled ``nn.Module``, a checkpoint pickling custom classes) is refused with a message naming the
explicit, opt-in conversion for a file the user trusts: ``python -m lpld.models.convert_checkpoint IN OUT --trust``.

Wrapper prefixes are removed when the model itself has no such prefix: ``model.`` (a LightningModule
holding the network as ``self.model``; keys of other submodules are dropped), ``module.`` (DDP) and
``_orig_mod.`` (``torch.compile``).
"""

from __future__ import annotations

import os
import pickle
import re
import shlex
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from lpld.core.io import ArtifactError

# (prefix, may other keys exist next to it?) -- a LightningModule can own more than the network
_WRAPPER_PREFIXES = (("model.", True), ("module.", False), ("_orig_mod.", False))


class ModelCheckpointError(ArtifactError):
    """``model.checkpoint`` is missing, unreadable, or does not fit the configured architecture."""


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


class UnsafeCheckpointError(ModelCheckpointError):
    """The file needs the full unpickler (which can run code); lpld refuses it and names the conversion."""


def conversion_hint(path: Path) -> str:
    """The command that converts a *trusted* legacy pickle into a safetensors weights file."""
    out = path.with_name(path.stem + ".safetensors")
    return (
        f"If you trust this file, convert it once with `python -m lpld.models.convert_checkpoint "
        f"{shlex.quote(str(path))} {shlex.quote(str(out))} --trust` and set model.checkpoint={out}"
    )


def torch_load_reason(e: BaseException) -> str:
    """``e``'s message without torch's advice to retry with ``weights_only=False`` (which would run the pickle's
    code): for a weights-only refusal, only the unpickler's own reason."""
    text = str(e)
    if "Weights only load failed" not in text:
        return text.strip().splitlines()[0] if text.strip() else type(e).__name__
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    reason = " ".join(found.group(1).split()) if found else "not a plain-tensor pickle"
    return reason.split(" Please use `torch.serialization")[0]


def check_plain_tensor_file(path: Path, fix: str) -> None:
    """Refuse a torch file that the weights-only loader refuses, naming it and ``fix``; read without loading the
    tensor data (memory-mapped), before Lightning or another loader opens it.

    Raises:
        UnsafeCheckpointError: the file pickles Python objects (or is not a pickle the weights-only loader reads).
        ModelCheckpointError: the file cannot be read at all.
    """
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it pickles the Python object {found.group(1)}" if found else torch_load_reason(e)
        raise UnsafeCheckpointError(
            f"checkpoint {path} is not a plain-tensor file ({what}), so it cannot be trusted: lpld never unpickles "
            f"Python objects (that can run code hidden in the file); {fix}"
        ) from e
    except Exception as e:  # noqa: BLE001 - truncated zip, wrong format: unusable either way
        raise ModelCheckpointError(f"checkpoint {path} cannot be read ({torch_load_reason(e)}); {fix}") from e


def load_weights_file(path: Path) -> object:
    """Read a weights file without ever running pickled code.

    ``.safetensors`` is read with safetensors; anything else with ``torch.load(weights_only=True)``, which
    only rebuilds tensors and plain containers. Files that need more are refused (``UnsafeCheckpointError``).
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch reports both refused globals and plain garbage as UnpicklingError: only the former is a
        # pickle that wants to build (or run) Python objects; the latter falls through as an unreadable file.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            raise
        raise UnsafeCheckpointError(
            f"checkpoint {path} contains pickled Python objects ({found.group(1)}) that the weights-only loader "
            "refuses. lpld never unpickles arbitrary objects: unpickling can run code hidden in the file. "
            + conversion_hint(path)
        ) from e


def extract_state_dict(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a loaded checkpoint object (see module docstring)."""
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                return dict(inner.state_dict())
            if _is_state_dict(inner):
                return dict(inner)
        if _is_state_dict(obj):
            return dict(obj)
        keys = sorted(map(str, obj))[:10]
        raise ModelCheckpointError(
            f"checkpoint {path} holds a dict with keys {keys} but no state dict (expected a raw state dict, "
            "or one under 'state_dict' or 'model'); point model.checkpoint at a weights file"
        )
    raise ModelCheckpointError(
        f"checkpoint {path} holds a {type(obj).__name__}, not a state dict; point model.checkpoint at a weights file"
    )


def strip_wrapper_prefixes(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Remove ``model.`` / ``module.`` / ``_orig_mod.`` prefixes the bare model does not have."""
    changed = True
    while changed:
        changed = False
        for prefix, others_allowed in _WRAPPER_PREFIXES:
            if any(k.startswith(prefix) for k in model_keys):
                continue
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if sub and (others_allowed or len(sub) == len(state)):
                state, changed = sub, True
    return state


def _preview(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_model_checkpoint(model: nn.Module, path: str | os.PathLike, model_desc: str) -> None:
    """Load the weights in ``path`` into ``model`` in place (strict: every key and shape must match).

    Args:
        model: freshly built registry model.
        path: ``model.checkpoint`` value.
        model_desc: human description of the configured model, used in error messages.

    Raises:
        ModelCheckpointError: missing file, unreadable file, or missing / unexpected / mis-shaped keys.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise ModelCheckpointError(
            f"model.checkpoint={path} is a directory, expected a teacher file (.pt) (model {model_desc}); set "
            "model.checkpoint to the weights file inside it (e.g. .../teacher/teacher.pt), or model.checkpoint=null"
        )
    if not p.is_file():
        raise ModelCheckpointError(
            f"model.checkpoint={path} does not exist (model {model_desc}); set model.checkpoint to an existing "
            "weights file, or model.checkpoint=null to use freshly initialised / pretrained weights"
        )
    try:
        obj = load_weights_file(p)
    except ModelCheckpointError:
        raise
    except Exception as e:  # any other read failure means the file is not a usable checkpoint
        raise ModelCheckpointError(
            f"could not read checkpoint {p} for model {model_desc}: {torch_load_reason(e)}; point model.checkpoint "
            "at a weights file (.safetensors, or a torch.save of a state dict)"
        ) from e
    target = model.state_dict()
    state = strip_wrapper_prefixes(extract_state_dict(obj, p), set(target))

    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in target.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {_preview(shapes, 3)}")
        raise ModelCheckpointError(
            f"checkpoint {p} does not match model {model_desc}: {'; '.join(parts)}. "
            "Check model.name / model knobs and the dataset (num_classes, channels, image_size) the checkpoint "
            "was trained with"
        )
    model.load_state_dict(state, strict=True)
