"""Where a model name points, decided before any download: a builtin, a local directory, a model id
already in the local Hugging Face cache, or a hub id to download.

transformers retries an unreachable hub for tens of seconds before it reports a connection error, and a
typo of a builtin name (``tiny-lama``) would go there too. ``model_source`` answers at once instead:
a near-miss of a builtin name gets "did you mean"; an id that is neither cached nor downloadable (offline
mode, or the hub endpoint refuses a connection within ``PROBE_TIMEOUT_S``) fails naming all three places
it looked.

A cached snapshot counts only if it holds what the caller is about to load (``needs``: the weights for a
model, the tokenizer files for a tokenizer): reading a model's ``config.json`` first caches that file
alone, and a snapshot without the weights must send the load to the hub, not to a directory that lacks them.
"""

from __future__ import annotations

import difflib
import os
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 1.5  # a connect to the hub endpoint that takes longer counts as unreachable
_TRUE = {"1", "true", "yes", "on"}
# What a load reads from a snapshot: every group must be present, any one file of a group will do.
Needs = tuple[tuple[str, ...], ...]
CONFIG: Needs = (("config.json",),)
WEIGHTS: Needs = CONFIG + (
    ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)
TOKENIZER: Needs = (("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt"),)


class ModelNotFoundError(ValueError):
    """A model name that is neither a builtin, a local directory, a cached id nor a reachable hub id."""


@dataclass(frozen=True)
class ModelSource:
    """``path`` to hand to ``from_pretrained`` and whether it must stay offline (``local_only``)."""

    path: str
    local_only: bool


def offline_mode() -> bool:
    """True when Hugging Face's offline switches are set (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint (``HF_ENDPOINT``, default huggingface.co) opens within
    ``timeout`` seconds. Name resolution runs in a thread so a hanging DNS lookup is bounded too."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def cached_snapshot(model_id: str, needs: Needs = CONFIG) -> str | None:
    """The local snapshot directory of ``model_id`` in the Hugging Face cache (``HF_HOME``) when it holds
    the files ``needs`` names, else None.

    Loading that directory rather than the id keeps transformers off the network: given an id, it still
    asks the hub for optional files (e.g. ``adapter_config.json``) even with ``local_files_only``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        return None
    snapshot = None
    for group in needs:
        try:
            found = [try_to_load_from_cache(model_id, f) for f in group]
        except ValueError:  # not a valid repo id
            return None
        paths = [f for f in found if isinstance(f, str)]
        if not paths:
            return None
        snapshot = os.path.dirname(paths[0])
    return snapshot


def near_builtin(name: str, builtins: tuple[str, ...]) -> str | None:
    """The builtin ``name`` is probably a typo of (case-insensitive, close spelling), or None."""
    if "/" in name:
        return None
    lowered = {b.lower(): b for b in builtins}
    if name.lower() in lowered:
        return lowered[name.lower()]
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.75)
    return lowered[match[0]] if match else None


def model_source(name: str, builtins: tuple[str, ...], needs: Needs = WEIGHTS) -> ModelSource:
    """Resolve a non-builtin model name for a load that reads ``needs`` (see the module docstring);
    raises ``ModelNotFoundError``."""
    if os.path.isdir(name):
        return ModelSource(name, local_only=True)
    guess = near_builtin(name, builtins)
    if guess is not None:
        raise ModelNotFoundError(f"unknown model {name!r}: did you mean {guess!r}? (builtins: {list(builtins)})")
    if os.path.sep in name.replace("/", "", 1) or name.startswith((".", "~", os.path.sep)) or name.count("/") > 1:
        raise ModelNotFoundError(f"model directory {name!r} does not exist")
    snapshot = cached_snapshot(name, needs)
    if snapshot is not None:
        return ModelSource(snapshot, local_only=True)
    why = "offline mode is set" if offline_mode() else ("" if hub_reachable() else "the hub is unreachable")
    if why:
        if cached_snapshot(name) is not None or cached_snapshot(name, TOKENIZER) is not None:
            wanted = " and ".join(" or ".join(group) for group in needs)
            raise ModelNotFoundError(
                f"model {name!r} is in the local Hugging Face cache without {wanted}, and {why}"
            )
        raise ModelNotFoundError(
            f"model {name!r} is neither a builtin ({list(builtins)}), a local directory, nor a model id in "
            f"the local Hugging Face cache, and {why}"
        )
    return ModelSource(name, local_only=False)
