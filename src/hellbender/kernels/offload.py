"""``activation_offloading``: move the activations autograd keeps to CPU memory or to disk.

With gradient checkpointing on, what autograd keeps between forward and backward is essentially
one hidden state per layer (each checkpoint's input) plus the few tensors outside the layers
(the final norm, the head, the loss). Those are what this moves, through
``torch.autograd.graph.saved_tensors_hooks``: the *pack* hook is called when autograd saves a
tensor for backward and may return anything; the *unpack* hook gets that back in the backward
and must return the tensor.

* ``true`` — to CPU memory: on a GPU, each saved activation is copied to pinned host memory
  (asynchronously, on the compute stream) and copied back when the backward needs it. On a
  CPU-only machine the activations already *are* in CPU memory, so this is a no-op and says so.
* ``disk`` — to files: each saved activation is written to a file in a private temporary
  folder and read back (then the file is deleted) when the backward needs it. This frees host
  RAM too, at the cost of disk I/O; the folder is removed when the step's context exits, even
  on error.

What is *not* moved: parameters and buffers (autograd saves weights for the matmul backward;
copying them every step would only cost time — they never leave memory anyway) and tensors
smaller than ``min_bytes`` (not worth a copy or a file). Offloading is why checkpointing is
required (rule HB108): without it autograd saves every intermediate and the copying would
dominate the step.

Usage: the training loop wraps forward *and* backward::

    with activation_offloading(model, cfg.activation_offloading):
        loss = loss_sum(model, inputs, labels, cfg) / n_tokens
        loss.backward()
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from hellbender.kernels.model_parts import model_device

logger = logging.getLogger(__name__)

DEFAULT_MIN_BYTES = 1 << 20  # 1 MiB: smaller tensors stay where they are


@dataclass
class OffloadStats:
    """What one context moved (for logs, the benchmark and the tests)."""

    mode: str
    tensors: int = 0
    bytes: int = 0
    restored: int = 0
    folder: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _OnHost:
    cpu: torch.Tensor
    device: torch.device


@dataclass
class _OnDisk:
    path: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    loaded: torch.Tensor | None = None


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.warning(message)


def _model_storages(model: nn.Module) -> set[int]:
    ptrs = set()
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type != "meta":
            ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


@contextlib.contextmanager
def activation_offloading(
    model: nn.Module,
    mode: bool | str,
    *,
    min_bytes: int = DEFAULT_MIN_BYTES,
    directory: str | os.PathLike[str] | None = None,
) -> Iterator[OffloadStats]:
    """Offload saved activations during the ``with`` block; yields the :class:`OffloadStats`."""
    if not mode:
        yield OffloadStats(mode="off")
        return
    if mode not in (True, "cpu", "disk"):
        raise ValueError(f"activation_offloading: expected true or disk, got {mode!r}")
    skip = _model_storages(model)
    device = model_device(model)

    def worth_moving(t: torch.Tensor) -> bool:
        if t.layout != torch.strided or t.device.type == "meta" or t.numel() == 0:
            return False
        if t.numel() * t.element_size() < min_bytes:
            return False
        return t.untyped_storage().data_ptr() not in skip

    if mode in (True, "cpu"):
        stats = OffloadStats(mode="cpu")
        if device.type == "cpu":
            note = ("activation_offloading: true is a no-op on this machine: the model runs on the CPU, so "
                    "its activations already live in CPU memory. Use activation_offloading: disk to move "
                    "them out of RAM.")
            _say_once(note)
            stats.mode = "cpu-noop"
            stats.notes.append(note)
            yield stats
            return

        def pack_host(t: torch.Tensor) -> torch.Tensor | _OnHost:
            if t.device.type == "cpu" or not worth_moving(t):
                return t
            cpu = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            # Asynchronous on the compute stream: the caching allocator only reuses t's memory for
            # work queued after this copy, so freeing t right away is safe.
            cpu.copy_(t, non_blocking=True)
            stats.tensors += 1
            stats.bytes += t.numel() * t.element_size()
            return _OnHost(cpu=cpu, device=t.device)

        def unpack_host(h: torch.Tensor | _OnHost) -> torch.Tensor:
            if isinstance(h, torch.Tensor):
                return h
            stats.restored += 1
            return h.cpu.to(h.device, non_blocking=True)

        with torch.autograd.graph.saved_tensors_hooks(pack_host, unpack_host):
            yield stats
        return

    folder = tempfile.mkdtemp(prefix="hellbender-offload-", dir=directory)
    stats = OffloadStats(mode="disk", folder=folder)
    counter = itertools.count()

    def pack_disk(t: torch.Tensor) -> torch.Tensor | _OnDisk:
        if not worth_moving(t):
            return t
        path = os.path.join(folder, f"{next(counter)}.bin")
        host = t.detach().to("cpu").contiguous()
        host.view(-1).view(torch.uint8).numpy().tofile(path)
        nbytes = host.numel() * host.element_size()
        stats.tensors += 1
        stats.bytes += nbytes
        return _OnDisk(path=path, shape=t.shape, dtype=t.dtype, device=t.device, nbytes=nbytes)

    def unpack_disk(h: torch.Tensor | _OnDisk) -> torch.Tensor:
        if isinstance(h, torch.Tensor):
            return h
        if h.loaded is None:  # first use: read and delete the file; later uses share the tensor
            raw = torch.from_file(h.path, shared=False, size=h.nbytes, dtype=torch.uint8)
            os.remove(h.path)
            h.loaded = raw.view(h.dtype).view(h.shape).to(h.device)
            stats.restored += 1
        return h.loaded

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack_disk, unpack_disk):
            yield stats
    finally:
        shutil.rmtree(folder, ignore_errors=True)
