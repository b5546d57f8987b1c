"""Measuring tools for the optimization tests and benchmarks (not used in training).

They answer the two questions every optimization test asks besides "same numbers?":

* *is the optimized code actually running?* — :func:`graph_node_names` lists the autograd nodes
  behind a loss, so a test can require e.g. ``ChunkedLinearCrossEntropyBackward`` to be there;
* *does it keep less for the backward?* — :func:`saved_storage_bytes` records, through
  ``saved_tensors_hooks``, every distinct storage autograd keeps alive between forward and
  backward (parameters excluded: they are alive anyway).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def graph_node_names(t: torch.Tensor) -> set[str]:
    """Names of every autograd node reachable from ``t.grad_fn``."""
    names: set[str] = set()
    seen: set[int] = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(node.name())
        stack.extend(fn for fn, _ in node.next_functions)
    return names


@contextlib.contextmanager
def saved_storage_bytes(model: nn.Module) -> Iterator[dict[int, int]]:
    """Yield a dict {storage pointer: bytes} of what autograd saves inside the block.

    Summing the values gives the memory the saved activations pin. Tensors saved inside a
    non-reentrant checkpoint are not seen (the checkpoint's own hooks take precedence): exactly
    the point, as the checkpoint does not keep them.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen
