"""The logged training loss is the global batch's: averaged over a real two-process group.

The ranks are spawned interpreters reporting through files: nothing here forks the test
process, which holds the session's Ray driver (a forked copy of its gRPC state can wedge it)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from radjepa.engine import mean_over_ranks


def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        value = float(mean_over_ranks(torch.tensor([0.25, 0.75][rank])))
        (Path(out) / f"rank{rank}").write_text(repr(value))
    finally:
        dist.destroy_process_group()


def test_loss_is_averaged_over_the_ranks(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)  # spawn, never fork
    assert [float((tmp_path / f"rank{r}").read_text()) for r in (0, 1)] == [0.5, 0.5]
    single = torch.tensor(0.3)
    assert mean_over_ranks(single) is single  # no process group: the value itself
