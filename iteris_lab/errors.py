"""Errors with messages that name the problem. All are ValueErrors, so `except ValueError` catches them."""


class IterisError(ValueError):
    """Base class of every error raised for bad input."""


class AdapterError(IterisError):
    """An adapter folder is missing, corrupt, unsupported, or does not fit the base model."""


class CalibrationError(IterisError):
    """Calibration data is missing, empty, all padding, or produced non-finite features."""


class SolveError(IterisError):
    """A closed-form solve is ill-posed (e.g. α = 0 with a singular Gram)."""


class ExportError(IterisError):
    """An adapter cannot be written where asked."""
