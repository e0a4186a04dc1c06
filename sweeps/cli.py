"""The ``embscale`` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; modules
are imported only when their subcommand runs, so ``embscale params`` never pays for pandas or submitit.
User errors (bad config, bad sweep file, missing path) exit with code 2 and a message naming the field or file.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from models.config import ConfigError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("sweeps.cmd_params", "parameter and FLOP accounting of a model config"),
    "train": ("sweeps.train", "train one run from a run file"),
    "demo": ("sweeps.demo", "the main job: a small matched sweep end to end"),
    "plan": ("sweeps.cmd_plan", "expand a sweep file into parameter-matched runs"),
    "submit": ("sweeps.cmd_submit", "submit a sweep through submitit"),
    "status": ("sweeps.cmd_status", "state of every run of a sweep"),
    "cancel": ("sweeps.cmd_cancel", "cancel a sweep's queued and running jobs"),
    "tune": ("sweeps.cmd_tune", "tune hyperparameters of a sweep with Optuna"),
    "collect": ("analysis.cmd_collect", "gather a sweep's runs into runs.parquet and curves.parquet"),
    "plots": ("analysis.cmd_plots", "fit and regenerate a sweep's figures"),
    "collisions": ("analysis.cmd_collisions", "n-gram hash hit and collision rates against table size"),
    "bench": ("kernels.bench", "GPU benchmarks into BENCHMARKS.md"),
}


class UserError(Exception):
    """Bad input from the user (a missing file, an impossible request): exit code 2."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit code 2). ``analysis.store.ResultsError`` counts once that module is
    loaded (it cannot have been raised before), which keeps pandas out of commands that never need it."""
    types: tuple[type[BaseException], ...] = (ConfigError, UserError)
    store = sys.modules.get("analysis.store")
    if store is not None:
        types += (store.ResultsError,)
    return types


def _available_commands() -> dict[str, tuple[str, str]]:
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="embscale", description="Embedding-vs-expert scaling-law harness.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    for name, (module_name, help_text) in _available_commands().items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    available = _available_commands()
    # Import only the module of the command asked for; the full parser is built for --help alone.
    if argv and argv[0] in available:
        module = importlib.import_module(available[argv[0]][0])
        parser = argparse.ArgumentParser(prog=f"embscale {argv[0]}", description=available[argv[0]][1])
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        try:
            return int(module.run(args) or 0)
        except Exception as exc:
            if not isinstance(exc, user_error_types()):
                raise
            print(f"embscale {argv[0]}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    parser, _ = build_parser()
    if not argv:
        parser.print_help()
        return 2
    parser.parse_args(argv)  # unknown command: argparse exits 2 with a message
    return 2


if __name__ == "__main__":
    sys.exit(main())
