"""The Stable Diffusion families (SD1.x, SD2.x, SDXL): facts in ``family.py``, loading base models in
``files.py`` (offline, with the config folders of ``offline.py``), the bundle and its training in ``model.py``."""
