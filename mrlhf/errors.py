"""User-facing errors: printed as one line by the CLI, which exits with code 2."""

from __future__ import annotations


class MrlhfError(Exception):
    """Base class for errors caused by user input (config, data, paths), not by bugs."""

    exit_code = 2


class DataError(MrlhfError):
    """A problem in a data file, located by path, 1-based line and field where known."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.message = message
        location = str(path) if line is None else f"{path}:{line}"
        detail = message if field is None else f"field '{field}': {message}"
        super().__init__(f"{location}: {detail}")


class ConfigError(MrlhfError):
    """An invalid configuration: unknown key, wrong type, impossible layout."""


class CheckpointError(MrlhfError):
    """A checkpoint that is missing, incomplete or does not match the run."""


class ConversionError(MrlhfError):
    """A model directory or checkpoint that cannot be converted (unsupported architecture, missing or mismatched
    tensors, unsafe pickle, impossible target layout); the message names the file or config field."""


class TrainingError(MrlhfError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why and what to try."""
