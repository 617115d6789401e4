"""Every user-facing error tunelab raises.

    TunelabError                 base; the CLI prints its message on one line and exits with ``exit_code``
    ├── ConfigError              a config field is missing, unknown or has a bad value (exit 2)
    ├── DataError                an input record or file is malformed: ``file:line: field: problem``
    ├── ModelError               a model, adapter or tokenizer cannot be loaded or is incompatible
    └── RunError                 a run cannot start or continue (output folder in use, NaN loss, ...)
"""

from __future__ import annotations


class TunelabError(Exception):
    """Base of all errors meant for the user rather than for a traceback."""

    exit_code = 1


class ConfigError(TunelabError):
    """A configuration value is invalid; raised before any model loads."""

    exit_code = 2


class DataError(TunelabError):
    """A data file or record is malformed.

    ``source`` is ``file:line`` (or just ``file``), ``field`` the offending field when one applies.
    """

    def __init__(self, source: str, field: str | None, problem: str) -> None:
        self.source = source
        self.field = field
        self.problem = problem
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {problem}")


class ModelError(TunelabError):
    """A model, tokenizer or adapter cannot be loaded or used as asked."""


class RunError(TunelabError):
    """A run cannot start or had to stop (output folder in use, non-finite loss, ...)."""
