"""Serving many adapters on one base: mixed-adapter batches, an adapter registry with an LRU bound,
a batching generation engine and an OpenAI-compatible HTTP server."""

from lorakit.serving.mixed import (
    BASE,
    MixedBatchError,
    adapter_rows,
    enable_adapter_names,
    generate,
    generate_rows,
    mixed_forward,
)

__all__ = [
    "BASE",
    "MixedBatchError",
    "adapter_rows",
    "enable_adapter_names",
    "generate",
    "generate_rows",
    "mixed_forward",
]
