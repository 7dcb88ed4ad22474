"""The ``dnmf`` command line: see :mod:`dnmf.cli.fit`."""

from __future__ import annotations

from .fit import main

__all__ = ["main"]
