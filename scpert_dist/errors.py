"""Named errors. Each says which file, which field, and what to do; the CLI prints them without a traceback
and exits with code 2."""

from __future__ import annotations


class ScpertError(Exception):
    """Base class of every error a user can cause with bad input."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None, hint: str | None = None):
        self.path = None if path is None else str(path)
        self.field = field
        self.hint = hint
        parts = [message]
        if self.path:
            parts.append(f"file: {self.path}")
        if field:
            parts.append(f"field: {field}")
        if hint:
            parts.append(f"what to do: {hint}")
        super().__init__("\n  ".join(parts))


class InputFileError(ScpertError):
    """An input file is missing, unreadable, corrupt or in the wrong format."""


class MetadataError(ScpertError):
    """A metadata table lacks a column, or a value in it is invalid (ids, doses, units)."""


class ValueRangeError(ScpertError):
    """Numeric data holds NaN/Inf or values outside the allowed range."""


class GeneMappingError(ScpertError):
    """Genes could not be mapped to the reference panel."""


class SmilesError(ScpertError):
    """A SMILES string could not be parsed."""


class SplitError(ScpertError):
    """A split is empty or inconsistent."""


class OutputError(ScpertError):
    """The output location cannot be written."""


class ShardError(ScpertError):
    """A Parquet shard is missing, truncated or fails its checksum."""


class ConfigError(ScpertError):
    """A configuration file or option is invalid."""


class CheckpointError(ScpertError):
    """A checkpoint is missing, corrupt, or does not match the data (gene panel, vocabularies)."""


class SweepError(ScpertError):
    """A sweep produced no usable trial."""


class FetchError(ScpertError):
    """A public file could not be downloaded or failed its verification (host unreachable, HTTP error, checksum)."""
