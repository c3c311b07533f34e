"""Adapter methods (one file each) behind one small interface; see lorakit.adapters.base."""
