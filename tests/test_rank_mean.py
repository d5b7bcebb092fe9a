"""The logged training loss is the global batch's: averaged over a real two-process group."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.pretrain import mean_over_ranks


def _rank(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out[rank] = float(mean_over_ranks(torch.tensor([0.25, 0.75][rank])))
    finally:
        dist.destroy_process_group()


def test_loss_is_averaged_over_the_ranks() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(port, out), nprocs=2, join=True)
        assert dict(out) == {0: 0.5, 1: 0.5}
    single = torch.tensor(0.3)
    assert mean_over_ranks(single) is single  # no process group: the value itself
