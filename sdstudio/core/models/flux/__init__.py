"""Flux.1 (dev, schnell): a flow-matching transformer family (docs/models.md, "Flux.1")."""
