"""Training: the loop, data, callbacks, checkpoints."""

# The loop's public API, imported lazily so ``lorakit.train.data`` & co. stay light to import.
_LAZY = {
    "train": "lorakit.train.trainer",
    "TrainResult": "lorakit.train.trainer",
    "NonFiniteLossError": "lorakit.train.trainer",
    "RunConfig": "lorakit.train.config",
    "load_run_config": "lorakit.train.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorakit.train' has no attribute {name!r}")
