"""The errors vitok raises.

    VitokError                      anything vitok refuses to do; the CLI prints it on one line
    ├── UsageError                  a bad option, preset, feature or source (CLI exit code 2)
    │   └── SettingsMismatchError   OUT was written with other settings (names each difference)
    ├── CheckpointError             a checkpoint that cannot be read or does not fit the model
    ├── ImageError                  one image that cannot be used (recorded as skipped, never fatal)
    └── StoreError                  an output store that is missing, damaged or incomplete

Per-image problems are ``ImageError``: the extractor records them in the manifest and goes on.
"""

from __future__ import annotations


class VitokError(Exception):
    """Base class of every error vitok raises on purpose."""

    exit_code = 1


class UsageError(VitokError):
    """The caller asked for something that cannot work as given."""

    exit_code = 2


class SettingsMismatchError(UsageError):
    """An existing output store was written with different settings."""


class CheckpointError(VitokError):
    """A checkpoint is missing, unreadable, or does not match the encoder."""


class ImageError(VitokError):
    """One input image cannot be decoded or preprocessed; the message is its one-line reason."""


class StoreError(VitokError):
    """An output store is damaged, incomplete or not a vitok store."""
