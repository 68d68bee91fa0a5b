"""data part of the core."""
