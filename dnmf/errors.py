"""The errors and warnings dnmf raises: one family, one sentence each, naming the problem and
the fix, and the message shapes they share."""

from __future__ import annotations


class DnmfError(ValueError):
    """Base class of every error dnmf raises about its inputs or state."""


class InvalidMatrixError(DnmfError):
    """The input matrix cannot be factored as given (values, shape, dtype)."""


class StoreError(DnmfError):
    """A store (input Zarr, result, checkpoint) is missing, unreadable or corrupt."""


class ParameterError(DnmfError):
    """A parameter or a combination of parameters is invalid."""


class CheckpointMismatchError(DnmfError):
    """A checkpoint does not belong to this matrix or these settings."""


class DivergenceError(DnmfError):
    """The iterates became non-finite (NaN or Inf): the fit stopped, and nothing was reported as fitted."""


class LockedError(DnmfError):
    """A folder a fit would write (its checkpoint, a spill folder) is locked by another run."""


class FormatError(DnmfError):
    """A file cannot be read as a matrix in the format its name or contents suggest."""


class BlockNotReceived(DnmfError):
    """A block the client holds was lost with its worker and the client did not send it again
    (:mod:`dnmf.data.resident`)."""


class MatrixTypeError(InvalidMatrixError, TypeError):
    """The input's entries are not numbers (an object array holding other things)."""


class DtypeMismatchError(ParameterError, TypeError):
    """A custom W or H has another dtype than the one X is factored in (scikit-learn raises TypeError)."""


class FitInterrupted(Exception):
    """A fit stopped on a signal (SIGTERM, SIGUSR1) after writing a checkpoint of its last
    iteration; the same call with ``resume="auto"`` continues it.

    Not a :class:`DnmfError`: nothing is wrong with the inputs. ``signal_name``, ``iteration``
    and ``checkpoint`` say what stopped it, after which iteration, and where its state is.
    """

    def __init__(self, signal_name: str, iteration: int, checkpoint: str):
        self.signal_name, self.iteration, self.checkpoint = signal_name, int(iteration), str(checkpoint)
        super().__init__(
            f"The fit stopped on {signal_name} after iteration {iteration} and saved it in the checkpoint "
            f"{checkpoint!r}; run it again with resume=\"auto\" (dnmf fit ... --resume auto) to continue."
        )


class CheckpointWarning(UserWarning):
    """A checkpoint version was unusable and an older one was used instead."""


def expected(what: str, got: object, hint: str = "") -> str:
    """Format the house message shape: 'Expected ... Got ... instead.'"""
    message = f"Expected {what}. Got {got!r} instead."
    return f"{message} {hint}" if hint else message


def no_such_path(what: str, path: str) -> str:
    """Format the message for an input that is not there: 'No ... at PATH: the path does not exist.'"""
    return f"No {what} at {path!r}: the path does not exist."
