"""Exceptions: one class per phatgoose_status, each carrying the library's one-line message."""

from . import _native

NON_FINITE_INPUT = _native.NON_FINITE_INPUT


class Error(Exception):
    """A failed Phatgoose call. `status` is the C status code, `status_name` its name, `message` the library's
    message (also the exception's text)."""

    def __init__(self, message, status=_native.INTERNAL):
        super().__init__(message)
        self.message = message
        self.status = status
        self.status_name = _native.lib.phatgoose_status_name(status).decode()


class InvalidArgumentError(Error, ValueError):
    """An argument or option out of range, a NULL or misaligned buffer, overlapping buffers."""


class InvalidHandleError(Error):
    """A closed (destroyed) library, runtime or layer, or a layer of another runtime."""


class ShapeError(Error, ValueError):
    """An array whose shape or size does not fit the layer."""


class NotFoundError(Error, LookupError):
    """No layer or expert of that name (any more)."""


class FileError(Error):
    """A file could not be opened or read."""


class LibraryError(Error):
    """The library or an expert's files are invalid, or an expert cannot be added as asked."""


class OverloadedError(Error):
    """Admission control refused the call (more than max_queued_calls at once)."""


class MemoryCapError(Error):
    """Loading would exceed memory_cap_bytes."""


class ShutDownError(Error):
    """The runtime was shut down."""


class BufferTooSmallError(Error):
    """A buffer given to the library was too small."""


class InternalError(Error):
    """A failure the library did not expect."""


class NonFiniteInputError(Error, ValueError):
    """Some input rows held NaN or infinite values: those tokens were not routed (experts -1, weights NaN, nothing
    added to their output rows), the others were applied. `result`, when set, is what the call would have returned,
    with those rows so marked."""

    result = None


class UnavailableError(Error):
    """This build of libphatgoose lacks what the call needs (MPI, for a distributed runtime)."""


class RankTimeoutError(Error):
    """A rank of a distributed runtime did not answer in time: it died or hangs; the runtime serves no more calls."""


_BY_STATUS = {
    _native.INVALID_ARGUMENT: InvalidArgumentError,
    _native.INVALID_HANDLE: InvalidHandleError,
    _native.SHAPE: ShapeError,
    _native.NOT_FOUND: NotFoundError,
    _native.IO: FileError,
    _native.LIBRARY: LibraryError,
    _native.OVERLOADED: OverloadedError,
    _native.MEMORY_CAP: MemoryCapError,
    _native.SHUT_DOWN: ShutDownError,
    _native.BUFFER_TOO_SMALL: BufferTooSmallError,
    _native.INTERNAL: InternalError,
    NON_FINITE_INPUT: NonFiniteInputError,
    _native.UNAVAILABLE: UnavailableError,
    _native.TIMEOUT: RankTimeoutError,
}


def error_for(status):
    """The exception for a failed call's `status`, with this thread's last error message (read at once, on the
    thread that made the call, so other threads' failures cannot interleave)."""
    message = _native.lib.phatgoose_last_error_message().decode("utf-8", errors="replace")
    return _BY_STATUS.get(status, Error)(message, status)


def check(status):
    """Raises the exception for `status` unless it is OK."""
    if status != _native.OK:
        raise error_for(status)


def invalid(message):
    return InvalidArgumentError(message, _native.INVALID_ARGUMENT)


def shape(message):
    return ShapeError(message, _native.SHAPE)


def closed(noun):
    return InvalidHandleError(f"{noun}: expected an open {noun}, found it closed", _native.INVALID_HANDLE)


__all__ = ["Error", "InvalidArgumentError", "InvalidHandleError", "ShapeError", "NotFoundError", "FileError",
           "LibraryError", "OverloadedError", "MemoryCapError", "ShutDownError", "BufferTooSmallError", "InternalError",
           "NonFiniteInputError"]
