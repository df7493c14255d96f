"""TEMP: the old import path of :mod:`hnkit.commands.cli`, kept only for tests/test_unet.py (owned by
the core rewrite) until it imports ``hnkit.commands.cli``; then delete this file."""

from .commands.cli import main  # noqa: F401
