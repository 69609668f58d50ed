"""Errors a user can act on. The CLI prints their message alone, without a traceback."""


class HealerError(Exception):
    """Bad input or an impossible request; the message says what and where, and what to do."""


class RecipeError(HealerError, ValueError):
    """A recipe or override that cannot be used; the message names the file and key."""


class UnsupportedArchitecture(HealerError):
    pass


class CalibrationError(HealerError):
    pass


class VerificationError(HealerError):
    """A saved checkpoint does not reproduce the in-memory model."""
