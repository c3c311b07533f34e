"""Training: the loop, data, callbacks, checkpoints.

``lorakit.train(...)`` is the training function: importing any ``lorakit.train.*`` module binds the name
``lorakit.train`` to this package, so the package itself is callable and calls
:func:`lorakit.train.trainer.train` (``lorakit.train.train`` is the same function).
"""

import sys
import types

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


class _TrainPackage(types.ModuleType):
    """This package, callable as the training function."""

    def __call__(self, *args, **kwargs):
        from lorakit.train.trainer import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _TrainPackage
