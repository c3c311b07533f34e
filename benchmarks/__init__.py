"""Benchmarks: lorakit against the peer (PEFT) in the same run. Entry point: python -m benchmarks.run."""
