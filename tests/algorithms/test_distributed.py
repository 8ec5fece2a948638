"""The collective helpers on two CPU processes with the gloo backend."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_ssl.algorithms.distributed import all_gather_cat, all_reduce_sum, is_distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        assert is_distributed()
        s = all_reduce_sum(torch.tensor([1.0, 2.0]) * (rank + 1))
        g = all_gather_cat(torch.full((2, 3), float(rank)))
        torch.save({"sum": s, "gather": g}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_single_process_is_identity():
    t = torch.arange(3.0)
    assert not is_distributed()
    assert all_reduce_sum(t.clone()).tolist() == [0.0, 1.0, 2.0]
    assert all_gather_cat(t).tolist() == [0.0, 1.0, 2.0]


def test_gloo_two_ranks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        res = torch.load(tmp_path / f"{r}.pt")
        assert res["sum"].tolist() == [3.0, 6.0]
        assert res["gather"][:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # rank order
