"""The collective helpers on two CPU processes with the gloo backend."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_ssl.algorithms.distributed import all_gather_cat, all_reduce_sum, average_gradients, is_distributed


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


def _grad_worker(rank, port, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        a, b, c = (torch.nn.Parameter(torch.zeros(2, 3)) for _ in range(3))
        a.grad = torch.full((2, 3), float(rank + 1))              # 1 and 2 -> 1.5
        b.grad = torch.full((2, 3), 4.0) if rank == 1 else None   # None counts as zeros -> 2
        average_gradients([a, b, c])                              # c: no rank has a gradient
        torch.save({"a": a.grad, "b": b.grad, "c": c.grad}, os.path.join(out, f"g{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_average_gradients_single_process_is_a_no_op():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 3.0])
    average_gradients([p])
    average_gradients([])
    assert p.grad.tolist() == [1.0, 3.0]


def test_average_gradients_gloo_two_ranks(tmp_path):
    mp.spawn(_grad_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        g = torch.load(tmp_path / f"g{r}.pt")
        assert g["a"].unique().tolist() == [1.5] and g["a"].shape == (2, 3)
        assert g["b"].unique().tolist() == [2.0]
        assert g["c"] is None
