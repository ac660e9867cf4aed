"""The CLI's subcommands, one module each.

A command module has a ``NAME``, ``add_parser(subparsers)`` that registers its arguments and sets
``handler=run``, and ``run(args) -> int`` (the exit status). ``search.cli.COMMANDS`` lists them.
Command modules import only the standard library and light modules of ours (``pruning.errors``,
``pruning.recipe``: no torch) at the top, and torch and the rest inside ``run``, so ``prunetune
--help`` answers at once.
"""
