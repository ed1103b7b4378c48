"""Exceptions of the training pipeline: user-fixable problems with data, caches and states."""

from __future__ import annotations

from ..errors import UniFusionError


class DatasetError(UniFusionError, ValueError):
    """A dataset file, row or image is unusable; the message names the file, the row and the fix."""


class CacheError(UniFusionError, ValueError):
    """A feature cache is missing, damaged, or was built for another VLM/VAE (stale)."""


class TrainStateError(UniFusionError, ValueError):
    """A training-state folder cannot be resumed or exported (missing, damaged or of another config)."""


class TrainConfigError(UniFusionError, ValueError):
    """A training option is invalid or does not fit the cache; the message names the option."""
