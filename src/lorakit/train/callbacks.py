"""The trainer's callback protocol (``Callback``, ``TrainState``): defined in ``lorakit.callbacks``, at
the bottom of the package so adapter methods can subclass it; this is its old import path."""

from lorakit.callbacks import Callback, TrainState

__all__ = ["Callback", "TrainState"]
