"""The ``hnkit`` command line: :mod:`hnkit.commands.cli` builds the parser; each command that needs
more than a few lines has a module of its own here, with ``add_arguments(parser)`` and ``run(args)``."""
