"""Errors raised by core.

Each carries a stable ``code`` so the service can map it to an HTTP status and store it on a
failed job without parsing messages. User input never fails through ``assert``.
"""

from __future__ import annotations


class VitqError(Exception):
    """Base class: something the caller can fix or should be told about."""

    code = "vitq_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidConfigError(VitqError, ValueError):
    """A QuantConfig field is out of range or inconsistent."""

    code = "invalid_config"


class ModelSpecError(VitqError, ValueError):
    """A model spec names an unknown model, bad kwargs, or weights that do not fit."""

    code = "invalid_model"


class DatasetError(VitqError, ValueError):
    """A dataset cannot be read, is malformed, or does not fit the model."""

    code = "invalid_dataset"


class CheckpointError(VitqError, ValueError):
    """A checkpoint file is not a vitq checkpoint, or is corrupt or unsafe."""

    code = "invalid_checkpoint"


class CancelledError(VitqError):
    """``should_stop()`` returned True; the run stopped between optimization steps."""

    code = "cancelled"
