"""Live measurement of a real model or process: parameters (efficiency report), memory, AdaLoRA ranks.

The cost planner, which predicts these without running anything, is :mod:`lorakit.planner`.
"""
