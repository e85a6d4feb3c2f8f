"""The errors vitok raises.

    VitokError                      anything vitok refuses to do; the CLI prints it on one line (exit 1)
    ├── UsageError                  a bad option, preset, feature or source (CLI exit code 2)
    │   ├── SettingsMismatchError   OUT was written with other settings (names each difference)
    │   └── InputsChangedError      the sources list other inputs than OUT's plan (counts added/removed)
    ├── CheckpointError             a checkpoint that cannot be read or does not fit the model
    ├── ImageError                  one image that cannot be used (recorded as skipped, never fatal)
    │   └── InputUnavailableError   one input that cannot be read right now (recorded as failed; retried later)
    ├── StoreError                  an output store that is missing, damaged, incomplete or not writable
    │   ├── NotAStoreError          a path given as a store that does not exist or is not one (also a UsageError:
    │   │                           exit code 2)
    │   └── DiskFullError           no space left while writing a shard (nothing incomplete is listed)
    ├── WorkersDiedError            decode workers that keep dying even with every image decoded in a process of its own
    ├── ClusterError                no Ray cluster answers at the address (--engine ray), or it cannot be joined
    └── Interrupted                 SIGINT/SIGTERM: the run stopped cleanly (exit 130 / 143)

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


class InputsChangedError(UsageError):
    """The sources no longer list what the store's plan lists (rerun with --update or --overwrite)."""


class CheckpointError(VitokError):
    """A checkpoint is missing, unreadable, or does not match the encoder."""


class ImageError(VitokError):
    """One input image cannot be decoded or preprocessed; the message is its one-line reason."""


class InputUnavailableError(ImageError):
    """One input cannot be read (missing, no permission, I/O error): not the image's fault, so a rerun retries it."""


class StoreError(VitokError):
    """An output store is damaged, incomplete, not a vitok store, or cannot be written."""


class NotAStoreError(StoreError, UsageError):
    """The path given as a store does not exist, is a file, or holds no run header: a usage error (exit 2)."""

    exit_code = 2


class DiskFullError(StoreError):
    """The file system ran out of space (or quota) while writing a shard."""


class WorkersDiedError(VitokError):
    """Decode workers died again and again without delivering an image, each image already isolated: not one bad
    image (that is recorded and skipped) but the machine (memory, a limit) or the input's reading."""


class ClusterError(VitokError):
    """``--engine ray``: nothing that answers as a Ray cluster at the address (or found by ``auto``), or Ray could
    not join or start one. A malformed address or a missing token is a ``UsageError`` instead."""


class Interrupted(BaseException):
    """The run was stopped by a signal; finished shards are kept and a rerun resumes."""

    def __init__(self, signal_number: int) -> None:
        import signal

        self.signal_number = signal_number
        self.exit_code = 128 + signal_number
        super().__init__(f"interrupted by {signal.Signals(signal_number).name}; rerun the same command to resume")
