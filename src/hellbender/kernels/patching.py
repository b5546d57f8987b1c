"""A small undo log for the attribute replacements the optimizations make.

Every optimization in :mod:`hellbender.kernels` works by replacing an attribute — a module
instance's ``forward``, a module-level function of a modeling file, a checkpointing flag — and
never by editing classes or rebuilding modules. Recording each replacement with the value it
replaced makes the whole set reversible in one call, which is what lets a test run the plain path
and the optimized path on the *same* weights, and lets a user's process load a second model
untouched by the first model's patches.

Instance-level ``forward`` replacement (rather than swapping submodules) keeps ``state_dict``
keys unchanged, so checkpoints written with an optimization on load without it and vice versa.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_MISSING = object()


class Patches:
    """An ordered undo log: :meth:`undo` restores every recorded attribute in reverse order."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.applied: list[str] = []

    def __len__(self) -> int:
        return len(self._undo)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, remembering whether ``obj`` had its own value before.

        An attribute that only existed on the class (a module's ``forward``) is *deleted* on undo
        rather than set back, so the instance falls back to its class again exactly as before.
        """
        own = vars(obj) if hasattr(obj, "__dict__") else {}
        old = own.get(name, _MISSING)
        setattr(obj, name, value)

        def restore() -> None:
            if old is _MISSING:
                if name in vars(obj):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(restore)

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when undoing (for state that is not a plain attribute, e.g. hooks)."""
        self._undo.append(fn)

    def note(self, what: str) -> None:
        """Record a human-readable line for :func:`hellbender.kernels.describe`."""
        self.applied.append(what)
        logger.info("optimization: %s", what)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.applied.clear()
