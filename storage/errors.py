"""The project's error types: what the command line reports as a user's mistake.

Every error raised for bad input, a bad setting or a damaged store derives from
``SwiftSamplerError``; the CLI prints those as one line (exit 2) and lets anything else -- a
bug -- surface with its traceback. ``UsageError`` is a bad argument or setting; it is also a
``ValueError``, so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class SwiftSamplerError(Exception):
    """Base of the errors that mean "the input is wrong", not "the code is wrong"."""


class UsageError(SwiftSamplerError, ValueError):
    """A bad argument or setting (out of range, unknown name, incompatible options)."""


__all__ = ["SwiftSamplerError", "UsageError"]
