"""One module per ``embscale`` subcommand, each with ``add_arguments(parser)`` and ``run(args) -> int``."""
