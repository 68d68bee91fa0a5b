"""The from-scratch family: a small UNet trained in pixel space (``model.py``), its facts in ``family.py``."""
