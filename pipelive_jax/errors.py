"""The small family of exceptions pipelive-jax raises at its surfaces.

Every message says what was wrong and, where it can, what would be right. Callers at the
surfaces (CLI, RPC, HTTP) catch `PipeliveError` and show the message, never a traceback.
"""

from __future__ import annotations


class PipeliveError(Exception):
    """Base of every error meant to be shown to a user."""


class ModelLoadError(PipeliveError):
    """A model name, path or file that cannot be found or read."""


class KernelInputError(PipeliveError, ValueError):
    """Arrays handed to a kernel that break its shape or dtype contract."""


class PlanError(PipeliveError, ValueError):
    """A pipeline plan that is not well formed (gap, overlap, unknown device, ...)."""


class AdmissionError(PipeliveError):
    """A plan or resize that would not fit the device memory budgets.

    Attributes carry the numbers so that RPC can return them in `error.data`.
    """

    def __init__(self, message: str, **numbers: object) -> None:
        super().__init__(message)
        self.numbers = numbers


class ConfigError(PipeliveError, ValueError):
    """A TOML config or option with an unknown key or a bad value."""


class ReconfigError(PipeliveError):
    """A reconfiguration that cannot start or that was aborted."""


class RequestError(PipeliveError, ValueError):
    """A generation request with bad parameters (empty prompt, negative max_tokens, ...)."""
