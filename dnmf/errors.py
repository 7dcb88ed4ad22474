"""The errors dnmf raises: one family, one sentence each, naming the problem and the fix."""

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


def expected(what: str, got: object, hint: str = "") -> str:
    """Format the house message shape: 'Expected ... Got ... instead.'"""
    message = f"Expected {what}. Got {got!r} instead."
    return f"{message} {hint}" if hint else message
