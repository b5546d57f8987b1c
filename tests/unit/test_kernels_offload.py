"""Activation offloading to disk: files appear in the forward, go in the backward, never leak."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from hellbender.kernels import offload
from hellbender.kernels.offload import activation_offloading


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 64)
        self.b = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).pow(2).sum()


def _grads(net: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in net.parameters()]


def test_disk_offload_round_trips_and_deletes_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(32, 16, requires_grad=True)
    net(x).backward()
    ref = [*_grads(net), x.grad.clone()]
    net.zero_grad()
    x.grad = None

    with activation_offloading(net, "disk", min_bytes=0, directory=tmp_path) as stats:
        loss = net(x)
        folder = Path(stats.folder)
        assert folder.parent == tmp_path
        files_after_forward = len(os.listdir(folder))
        loss.backward()
        files_after_backward = len(os.listdir(folder))
    got = [*_grads(net), x.grad.clone()]

    assert files_after_forward == stats.tensors > 0
    assert files_after_backward == 0  # each file is deleted when the backward has read it
    assert stats.restored == stats.tensors
    assert not folder.exists()
    for g, r in zip(got, ref, strict=True):
        assert torch.equal(g, r)  # bytes written and read back: bit-identical


def test_parameters_and_small_tensors_stay_in_memory(tmp_path: Path) -> None:
    frozen = nn.Linear(64, 64).requires_grad_(False)  # a frozen base weight, as under LoRA
    x = torch.randn(32, 64, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        frozen(x).sum()
    assert [t.untyped_storage().data_ptr() for t in saved] == [frozen.weight.untyped_storage().data_ptr()]

    # autograd saves exactly one tensor here, the weight — and that one is not offloaded.
    with activation_offloading(frozen, "disk", min_bytes=0, directory=tmp_path) as stats:
        frozen(x).sum().backward()
    assert stats.tensors == 0
    torch.testing.assert_close(x.grad, frozen.weight.sum(0).expand(32, 64))

    net = _Net()
    with activation_offloading(net, "disk", min_bytes=1 << 20, directory=tmp_path) as big_only:
        net(torch.randn(8, 16, requires_grad=True)).backward()
    assert big_only.tensors == 0  # every activation here is below 1 MiB


def test_folder_is_removed_when_the_step_fails(tmp_path: Path) -> None:
    net = _Net()
    x = torch.randn(8, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="boom"):
        with activation_offloading(net, "disk", min_bytes=0, directory=tmp_path) as stats:
            net(x)  # files written, backward never runs
            assert len(os.listdir(stats.folder)) > 0
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_cpu_offload_on_a_cpu_model_is_a_noop_that_says_so(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offload, "_said", set())  # the warning is once per process: start afresh
    caplog.set_level(logging.WARNING, logger=offload.__name__)
    net = _Net()
    x = torch.randn(8, 16, requires_grad=True)
    for _ in range(2):  # two steps, one warning
        with activation_offloading(net, True, min_bytes=0) as stats:
            net(x).backward()
        assert stats.mode == "cpu-noop" and stats.tensors == 0
        assert "no-op" in stats.notes[0]
    warnings = [r for r in caplog.records if r.name == offload.__name__]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "no-op" in warnings[0].getMessage() and "activation_offloading: disk" in warnings[0].getMessage()


def test_off_and_invalid_modes() -> None:
    net = _Net()
    with activation_offloading(net, False) as stats:
        assert stats.mode == "off"
    with pytest.raises(ValueError, match="true or disk"):
        with activation_offloading(net, "ram"):
            pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_offload_moves_gpu_activations_to_pinned_host_memory() -> None:
    net = _Net().cuda()
    x = torch.randn(256, 16, device="cuda", requires_grad=True)
    net(x).backward()
    ref = _grads(net)
    net.zero_grad()
    with activation_offloading(net, True, min_bytes=0) as stats:
        net(x).backward()
    assert stats.mode == "cpu" and stats.tensors > 0 and stats.restored == stats.tensors
    for g, r in zip(_grads(net), ref, strict=True):
        assert torch.equal(g, r)
