"""Model surgery: target matching, injection, adapter management, merging."""
