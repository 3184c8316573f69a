"""Published ImageNet-1k weights (``model.pretrained=true``) that fail fast and clearly when offline.

Weights already in the local cache are used without any network access (torchvision: the torch hub
checkpoint dir ``$TORCH_HOME/hub/checkpoints``; timm: the Hugging Face hub cache). Only when a file
is not cached is the weight host probed with a TCP connect bounded by ``PROBE_TIMEOUT_S``; if it is
unreachable, :class:`PretrainedWeightsError` is raised before any download is attempted, so an
offline machine gets the message in well under a second instead of hanging in urllib / huggingface_hub.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import torch

from lpld.core.errors import ConfigError

# Bound on the reachability probe (DNS + TCP connect); the thread join uses the same bound because
# socket timeouts do not cover getaddrinfo.
PROBE_TIMEOUT_S = 0.5


class PretrainedWeightsError(ConfigError, RuntimeError):
    """Published weights could not be obtained. The message names the fix.

    A user error (a :class:`ConfigError`: ``run.py`` prints it as one line): the fix is a config change or a
    network, never lpld's code. Still a RuntimeError for callers that catch it as one.
    """


def _fix_hint() -> str:
    return "Set model.pretrained=false, or model.checkpoint=/path/to/teacher.pt"


def host_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (DNS included)."""
    result: dict[str, bool] = {}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            result["ok"] = False

    # a daemon thread: an unresolvable name can block in getaddrinfo far longer than the timeout
    t = threading.Thread(target=probe, name=f"lpld-probe-{host}", daemon=True)
    t.start()
    t.join(timeout)
    return result.get("ok", False)


def url_reachable(url: str) -> bool:
    """Probe the host serving ``url``, or the configured HTTPS proxy when one is set."""
    proxy = urllib.request.getproxies().get(urlparse(url).scheme or "https")
    target = urlparse(proxy if proxy else url)
    if target.hostname is None:
        return False
    port = target.port or (443 if target.scheme == "https" else 80)
    return host_reachable(target.hostname, port)


def torchvision_state_dict(weights: object, model_name: str) -> dict[str, torch.Tensor]:
    """State dict of a torchvision weights enum member, from the hub cache or downloaded.

    Args:
        weights: e.g. ``torchvision.models.ResNet18_Weights.IMAGENET1K_V1`` (has ``.url``).
        model_name: registry name, for the error message.
    """
    url = weights.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not cached.is_file() and not url_reachable(url):
        raise PretrainedWeightsError(
            f"could not download weights for {model_name} (no network?): {url} is unreachable and "
            f"{cached} is not cached. {_fix_hint()}"
        )
    try:
        return torch.hub.load_state_dict_from_url(
            url, progress=False, check_hash=True, map_location="cpu", weights_only=True
        )
    except Exception as e:  # urllib / hash / unpickling errors all mean "no usable weights"
        raise PretrainedWeightsError(f"could not load weights for {model_name} from {url}: {e}. {_fix_hint()}") from e


def _hf_cached_file(repo_id: str) -> str | None:
    """Path of a cached timm weight file for ``repo_id`` (the names timm downloads), or None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str):
            return path
    return None


def timm_pretrained_overlay(timm_name: str, model_name: str) -> dict[str, str] | None:
    """``pretrained_cfg_overlay`` for ``timm.create_model(..., pretrained=True)``.

    Returns ``{"file": cached_path}`` when the weights are in the Hugging Face cache (loaded with no
    network, through timm's usual key filtering and in_chans / num_classes adaptation), ``None`` when
    they are not cached but the hub is reachable (timm downloads them), and raises otherwise.
    """
    import timm
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(timm_name)
    repo_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo_id:
        raise PretrainedWeightsError(f"timm has no published weights for {timm_name} ({model_name}). {_fix_hint()}")
    cached = _hf_cached_file(repo_id)
    if cached is not None:
        return {"file": cached}
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline_env or not url_reachable(constants.ENDPOINT):
        why = "HF_HUB_OFFLINE is set" if offline_env else f"{constants.ENDPOINT} is unreachable"
        raise PretrainedWeightsError(
            f"could not download weights for {model_name} (no network?): {why} and {repo_id} is not in the "
            f"Hugging Face cache. {_fix_hint()}"
        )
    return None
