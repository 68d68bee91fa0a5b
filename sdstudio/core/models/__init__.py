"""models part of the core."""
