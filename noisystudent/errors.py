"""Errors a user can act on. The CLI prints their message alone (no traceback) and exits 2."""


class NoisyStudentError(Exception):
    """Base class: the message names the file, key or setting at fault and what to do."""

    exit_code = 2


class ConfigError(NoisyStudentError):
    """A config key is missing, unknown or out of range."""


class DataError(NoisyStudentError):
    """A shard pattern, shard or sample cannot be used."""


class MissingInputError(NoisyStudentError):
    """A stage's input from an earlier stage is not there yet."""
