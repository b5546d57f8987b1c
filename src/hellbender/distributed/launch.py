"""``hellbender train CONFIG --nproc-per-node N``: start torchrun for the user, in one command.

This is ``torchrun [options] -m hellbender train CONFIG [overrides]`` run through
``torch.distributed.run`` in this process — torch's own launcher and elastic agent, not one of
ours: it starts the ranks, sets their environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, the
rendezvous), and when one rank fails it stops the others and reports which. One machine uses a
standalone rendezvous on a free local port; several machines meet at ``--rdzv-endpoint`` (c10d).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hellbender.errors import HellbenderError

RDZV_ID = "hellbender"


class LaunchError(HellbenderError, RuntimeError):
    """A rank of a launched run failed (the message names it and how)."""


@dataclass(frozen=True)
class Launch:
    """torchrun's options, as ``hellbender train`` takes them."""

    nproc_per_node: int
    nnodes: str = "1"  # "N" or torchrun's elastic "MIN:MAX"
    node_rank: int | None = None
    rdzv_endpoint: str | None = None

    def torchrun_args(self, command: Sequence[str]) -> list[str]:
        """The torchrun command line (without ``torchrun``) that runs ``hellbender <command>``."""
        args = ["--nproc-per-node", str(self.nproc_per_node), "--nnodes", self.nnodes, "--max-restarts", "0"]
        if self.rdzv_endpoint is None:
            if self.nnodes not in ("1", "1:1"):
                raise LaunchError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
            args.append("--standalone")  # a free local port; nothing else on the machine to meet
        else:
            args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", self.rdzv_endpoint, "--rdzv-id", RDZV_ID]
        if self.node_rank is not None:
            args += ["--node-rank", str(self.node_rank)]
        return [*args, "-m", "hellbender", *command]


def launch(spec: Launch, command: Sequence[str]) -> None:
    """Run ``hellbender <command>`` on ``spec``'s ranks and wait for them all.

    Raises :class:`LaunchError` naming the failed rank(s): its exit code, or the signal that
    killed it. The failed rank's own message (an ``ERROR:`` line) is above it in the output.
    """
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    parsed = torchrun.get_args_parser().parse_args(spec.torchrun_args(command))
    run: Callable[[Any], None] = torchrun.run  # torchrun's entry point after parsing (untyped in torch)
    try:
        run(parsed)
    except ChildFailedError as exc:
        raise LaunchError(describe_failures(exc.failures)) from None


def describe_failures(failures: Mapping[int, object]) -> str:
    """What ended the run: the rank that failed first (its exit code, or the signal that killed
    it), then the ranks torchrun stopped because of it."""

    def how(failure: object) -> str:
        code = int(getattr(failure, "exitcode", 1))
        if code >= 0:
            return f"exited with code {code}"
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"

    def when(item: tuple[int, object]) -> tuple[bool, float, int]:
        # torchrun stops the survivors with SIGTERM: a rank that ended otherwise came first.
        stopped = int(getattr(item[1], "exitcode", 1)) == -signal.SIGTERM
        return stopped, float(getattr(item[1], "timestamp", 0) or 0), item[0]

    (rank, first), *rest = sorted(failures.items(), key=when)
    text = f"rank {rank} (pid {getattr(first, 'pid', '?')}) {how(first)}"
    if rest:
        text += f"; then {', '.join(f'rank {r} {how(f)}' for r, f in sorted(rest))}"
    return text + " — the run stopped (its last complete checkpoint can be resumed)"
