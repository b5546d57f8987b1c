"""The errors hellbender raises for the user, as opposed to the ones that mean hellbender has a bug.

Every error a user can cause — and fix — by changing the config, the data, a file, the model
choice, an installed package or the machine is a :class:`HellbenderError`. The command line prints
its message as one ``ERROR:`` line and exits 1. Any other exception reaching the command line is
treated as a bug (in hellbender or in a library it uses): its traceback is written to a file and
the command exits 2. So a check that tells the user what to change raises one of these classes,
and a check of hellbender's own consistency (a function called with inconsistent arguments by
hellbender itself) keeps raising a plain builtin.

Each class also derives from the builtin that fits it (``ValueError``, ``FileNotFoundError``,
``RuntimeError``), so ``except ValueError`` in callers keeps working. Classes that belong to one
stage live next to its code (:class:`hellbender.config.findings.ConfigError`,
:class:`hellbender.data.errors.DataError`, :class:`hellbender.train.checkpoint.CheckpointError`,
...); the ones several stages raise are here. This module imports nothing from hellbender, so
every stage may import it.
"""

from __future__ import annotations

import errno


class HellbenderError(Exception):
    """A problem with the user's config, data, files, model or machine that one message explains.

    The message says what is wrong and what to change; no traceback is needed to act on it.
    """


class OptionError(HellbenderError, ValueError):
    """An option (or a combination of options) that this model, data or run cannot honour."""


class ModelLoadError(HellbenderError, ValueError):
    """The model, its tokenizer, its config or its adapter cannot be loaded or used as configured."""


class MissingFileError(HellbenderError, FileNotFoundError):
    """A file or folder the config points at (or that a command needs) does not exist."""


class UnavailableError(HellbenderError, RuntimeError):
    """An option needs a package or hardware (a GPU) that this machine does not have."""


class DiskFullError(HellbenderError, OSError):
    """A write failed because the filesystem holding ``path`` is full (or the user's quota is).

    Also an ``OSError`` with ``errno`` ENOSPC, so ``except OSError`` callers still see it as one.
    Raised from the places hellbender writes (checkpoints, metrics, final outputs, the dataset
    cache, :func:`hellbender.files.write_atomically`) with a message naming the path, the space
    the write needed and the space left; :func:`hellbender.files.disk_full_error` builds it.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC
        self.filename = path

    def __str__(self) -> str:  # OSError would print "[Errno 28] None: <path>" once errno is set
        return str(self.args[0])


__all__ = [
    "DiskFullError",
    "HellbenderError",
    "MissingFileError",
    "ModelLoadError",
    "OptionError",
    "UnavailableError",
]
