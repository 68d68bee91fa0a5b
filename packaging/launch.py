"""Entry script of the PyInstaller bundle: the same `sdstudio` program (no arguments: the app)."""

import multiprocessing
import sys

from sdstudio.__main__ import main

if __name__ == "__main__":
    multiprocessing.freeze_support()  # data-loader worker processes in a frozen build
    sys.exit(main())
