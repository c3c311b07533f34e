"""Measurement: parameters, time, memory, cost."""
