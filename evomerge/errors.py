"""Error types. Library code raises these; only the CLI turns them into exit codes.

Each subclass also inherits the builtin it means, so callers can catch either.
User errors (exit 2, one line) derive from `UserError`; anything else is a bug (exit 1).
"""

from __future__ import annotations

import errno

#: Exit codes of the CLI (README: "Exit codes"). 1 is left to bugs (a traceback).
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_NO_SUCCESS = 3  # the study ran to its budget but every candidate failed
EXIT_DISK_FULL = 75  # no space left (ENOSPC, EDQUOT): free some, then resume (EX_TEMPFAIL)
EXIT_CLUSTER_LOST = 69  # the Ray cluster is lost or unreachable: resume later (EX_UNAVAILABLE)
EXIT_INTERRUPTED = 130  # SIGINT; the run is resumable
EXIT_TERMINATED = 143  # SIGTERM (preemption: Slurm, Kubernetes, spot instances); resumable


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


class CheckpointError(UserError, ValueError):
    """A checkpoint with truncated or corrupt files, or a config.json that disagrees with its weights."""


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


class DiskFullError(EvomergeError, OSError):
    """No space left (ENOSPC, or a quota: EDQUOT) while writing `path`. Not a user error and not a
    bug: the CLI prints the one-line message (what to free, how to continue) and exits 75.
    Whatever was written before stays consistent: trials.jsonl whole lines, state files replaced
    atomically or not at all."""

    def __init__(
        self,
        message: str,
        path: str | None = None,
        err: int = errno.ENOSPC,
        *,
        hinted: bool = False,
    ) -> None:
        super().__init__(message)
        self.errno, self.filename = err, path  # as the OSError it stands for
        self.hinted = hinted  # the message already says what to do next

    def __str__(self) -> str:  # OSError's own would prefix "[Errno ...]" when errno is set
        return str(self.args[0])


class ClusterLostError(EvomergeError, ConnectionError):
    """The Ray cluster went away under the study: every node dead, its GCS (head node) silent,
    or no node able to take a worker. Neither a bug nor bad input: the CLI prints the one line
    and exits 69; the run is marked interrupted and `evomerge resume` continues it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, which schedulers send before SIGKILL. A KeyboardInterrupt, so every cleanup
    written for Ctrl-C (state marked interrupted, workers shut down) runs the same way; the CLI
    exits 143 instead of 130."""


def interrupt_exit_code(exc: BaseException) -> int:
    """143 for SIGTERM, 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
