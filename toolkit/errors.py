"""The typed errors of the toolkit: every failure a caller can see is one of these."""

from __future__ import annotations


class ToolkitError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class InvalidRequestError(ToolkitError, ValueError):
    """Bad input, found before anything reaches the worker (or refused by it without harm)."""


class QueueFullError(ToolkitError):
    """More requests are outstanding than `Settings.max_queue_size` allows."""


class RequestCancelledError(ToolkitError):
    """Raised only where a caller asked for cancellation to be an error."""


class RequestTimeoutError(ToolkitError, TimeoutError):
    """A request did not finish within the caller's `timeout_s`; it has been cancelled in the worker."""


class ModelNotFoundError(ToolkitError, ValueError):
    """A model name that no loader knows, or a file that is not where it should be."""


class RemoteError(ToolkitError):
    """An exception raised inside the worker, with the worker's traceback attached."""

    def __init__(self, message: str, remote_traceback: str = "", error_type: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback
        self.error_type = error_type

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            text += "\n\n--- worker traceback ---\n" + self.remote_traceback
        return text


class WorkerStartupError(RemoteError):
    """The worker failed to load its model or exited before it said Ready."""


class WorkerCrashedError(ToolkitError):
    """The worker process died; raised in every request that was in flight."""

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = -exitcode if exitcode is not None and exitcode < 0 else None


class WorkerHungError(ToolkitError):
    """With requests in flight, the worker sent nothing for `Settings.hang_timeout_s`, or one step ran past
    `Settings.step_timeout_s`."""


class WorkerNotRunningError(ToolkitError):
    """A request was submitted to a worker that is stopped, failed or not started."""


class PrefixCacheBusyError(ToolkitError):
    """`reset_prefix_cache()` while requests are waiting or running: their blocks cannot be forgotten."""
