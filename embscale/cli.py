"""The ``embscale`` command line: the top of the house; it imports every layer and nothing imports it.

Each subcommand is a module of :mod:`embscale.commands` with ``add_arguments(parser)`` and ``run(args) -> int``;
only the module of the command asked for is imported, so ``embscale params`` never pays for pandas or submitit.
This is the one place that turns errors into exit codes: bad input (:data:`embscale.base.errors.USER_ERRORS`:
a bad config or sweep file, a missing path) exits 2 with a message naming the field or file; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from embscale.base.errors import USER_ERRORS

# name -> one-line help; the module is embscale.commands.<name> (dashes as underscores)
COMMANDS: dict[str, str] = {
    "params": "parameter and FLOP accounting of a model config",
    "train": "train one run from a run file",
    "demo": "the main job: a small matched sweep end to end",
    "plan": "expand a sweep file into parameter-matched runs",
    "submit": "submit a sweep through submitit",
    "status": "state of every run of a sweep",
    "cancel": "cancel a sweep's queued and running jobs",
    "tune": "tune hyperparameters of a sweep with Optuna",
    "collect": "gather a sweep's runs into runs.parquet and curves.parquet",
    "plots": "fit and regenerate a sweep's figures",
    "findings": "the paper's findings as the reproduction sweeps measured them (REPRODUCTION.md)",
    "collisions": "n-gram hash hit and collision rates against table size",
    "bench": "GPU benchmarks into BENCHMARKS.md",
    "decode-bench": "decoding speed of a model or an NE/MoE pair over batch sizes, against its memory floor",
}


def command_module(name: str):
    return importlib.import_module(f"embscale.commands.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    """The whole parser, every command's arguments included (for ``--help``)."""
    parser = argparse.ArgumentParser(prog="embscale", description="Embedding-vs-expert scaling-law harness.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        command_module(name).add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # --help, or an unknown command: argparse prints and exits
        return 2
    name = argv[0]
    module = command_module(name)
    parser = argparse.ArgumentParser(prog=f"embscale {name}", description=COMMANDS[name])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as exc:
        print(f"embscale {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
