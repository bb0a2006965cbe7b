"""Error types. Library code raises these; only the CLI turns them into exit codes.

Each subclass also inherits the builtin it means, so callers can catch either.
User errors (exit 2, one line) derive from `UserError`; anything else is a bug (exit 1).
"""

from __future__ import annotations

#: Exit codes of the CLI (README: "Exit codes"). 1 is left to bugs (a traceback).
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_NO_SUCCESS = 3  # the study ran to its budget but every candidate failed
EXIT_INTERRUPTED = 130  # SIGINT; the run is resumable


class EvomergeError(Exception):
    """Base of every error evomerge raises on purpose."""


class UserError(EvomergeError):
    """Bad input from the user: the CLI prints one line and exits 2."""


class ConfigError(UserError, ValueError):
    """A config, recipe or search space that does not validate."""


class MissingPathError(UserError, FileNotFoundError):
    """A model, file or directory the user named does not exist."""


class IncompatibleModelsError(UserError, ValueError):
    """Source models that cannot be merged (architecture, tensor names or shapes differ)."""


class UnsafeCheckpointError(UserError, PermissionError):
    """A pickled checkpoint that we refuse to load without an explicit opt-in."""


class TaskError(UserError, ValueError):
    """An evaluation task that is unknown or cannot produce the requested metric."""


class RunDirError(UserError, ValueError):
    """A run directory that already exists (run) or holds no study (resume)."""


class CandidateError(EvomergeError, RuntimeError):
    """A candidate failed by itself (NaN metrics, exception while scoring): recorded, not fatal."""


class ResourceError(UserError, MemoryError):
    """The device cannot hold what the study asks for (out of memory): the message says what to cut."""
