"""TEMP: the old import path of :mod:`hnkit.commands.generate_image`, kept only for tests/test_unet.py
(owned by the core rewrite) until it imports ``hnkit.commands.generate_image``; then delete this file."""

from .commands.generate_image import parse_hypernetwork_spec  # noqa: F401
