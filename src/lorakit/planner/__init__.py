"""The cost planner: memory, time, money and ROI of a fine-tuning run, predicted from a model's shapes.

``plan`` (the entry point), ``arch`` (shapes from a config), ``cost`` (memory and FLOPs formulas), ``gpus``
(the packaged GPU table), ``roi``, ``advice``, ``plan_report`` (table / JSON), and ``calibrate``, which
checks the formulas against a real measured run. It sits above ``lorakit.bench`` (calibration reads its
memory probes) and beside ``lorakit.train``: neither imports the other.
"""
