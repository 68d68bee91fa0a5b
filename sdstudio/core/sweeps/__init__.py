"""Sweeps: a plan of validated combinations (`plan.py`, the search space in `space.py`), run one after
another through the ordinary training loop (`runner.py`, resumable through `state.py`), summarised
(`summary.py`) and drawn as an overlay of curves (`plot.py`)."""
