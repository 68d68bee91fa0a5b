"""train part of the core."""
