"""The lorakit version (one place; the package root and the model cards read it)."""

__version__ = "0.1.0"
