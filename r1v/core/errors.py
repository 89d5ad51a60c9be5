"""Errors that mean something to the machinery around a stage."""

from __future__ import annotations


class NotRetryable(RuntimeError):
    """An error the same inputs raise again (divergence, a broken reward): a restart of the worker group from the
    last checkpoint would only meet it again, so training fails at once instead of spending its retries."""
