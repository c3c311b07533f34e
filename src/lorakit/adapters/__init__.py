"""Adapter methods, one file each, behind one small interface (lorakit.adapters.base).

Importing this package registers the built-in methods in the method registry (``lorakit.methods``):
each file below ends with its own ``register(Method(...))``, in this order (the registry's and the CLI's).
"""

from lorakit.adapters import lora  # noqa: I001, F401
from lorakit.adapters import dora  # noqa: F401
from lorakit.adapters import adalora  # noqa: F401
