"""Errors that mean bad input. The command line turns each into a message naming the field or file and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """An invalid configuration value. ``field`` is the dotted path of the bad field (or the file's path)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    def under(self, prefix: str) -> ConfigError:
        """The same error, with its field path placed under ``prefix``."""
        if not prefix:
            return self
        nested = self.field and not self.field.startswith("[")
        joined = f"{prefix}.{self.field}" if nested else prefix + self.field
        return ConfigError(joined, self.message)

    def in_file(self, path: str) -> ConfigError:
        """The same error, naming the file it came from: ``path: field: message``."""
        return ConfigError(f"{path}: {self.field}" if self.field else str(path), self.message)


class UserError(Exception):
    """Bad input from the user that is not a config field: a missing file, an impossible request."""


class ResultsError(UserError):
    """Bad results input: a missing sweep folder, an empty results folder."""


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, UserError)


def exit_with(main: Callable[[], int], prog: str) -> None:
    """Exit with ``main()``'s code; bad input (:data:`USER_ERRORS`) as ``PROG: error: MESSAGE`` on stderr and exit
    code 2 (the ``if __name__ == "__main__"`` of a script run with ``python -m``)."""
    try:
        code = main()
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


__all__ = ["USER_ERRORS", "ConfigError", "ResultsError", "UserError", "exit_with"]
