"""FIFOQueue: wrap-around, fill count, validity, oversized enqueues, state_dict, DDP all-gather (spec 9.2)."""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_ssl.algorithms.contrastive.memory_bank import FIFOQueue


def rows(start, n, dim=2):
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, dim)


def test_wraparound_and_fill_count():
    q = FIFOQueue(size=5, dim=2, ddp_gather=False)
    assert q.valid_mask().sum() == 0 and q.fill_fraction == 0.0
    q.enqueue(rows(0, 3))
    assert int(q.fill) == 3 and int(q.ptr) == 3
    assert q.valid_mask().tolist() == [True, True, True, False, False]
    q.enqueue(rows(3, 4))  # writes 3, 4 at slots 3, 4, then 5, 6 at slots 0, 1
    assert int(q.fill) == 5 and int(q.ptr) == 2 and q.fill_fraction == 1.0
    assert q.data[:, 0].tolist() == [5, 6, 2, 3, 4]
    assert q.valid_mask().all()
    q.enqueue(rows(7, 1))
    assert q.data[:, 0].tolist() == [5, 6, 7, 3, 4] and int(q.ptr) == 3


def test_oversized_enqueue_keeps_random_whole_groups():
    q = FIFOQueue(size=6, dim=2, ddp_gather=False, seed=3)
    x = rows(0, 10)  # 5 groups of 2 rows, only 3 groups fit
    q.enqueue(x, group_size=2)
    kept = q.data[:, 0].tolist()
    assert int(q.fill) == 6 and int(q.ptr) == 0
    groups = [int(kept[i]) // 2 for i in range(0, 6, 2)]
    assert groups == sorted(groups) and len(set(groups)) == 3
    for i in range(0, 6, 2):  # rows of one group stay together
        assert kept[i + 1] == kept[i] + 1 and int(kept[i]) % 2 == 0
    q2 = FIFOQueue(size=6, dim=2, ddp_gather=False, seed=3)
    q2.enqueue(x, group_size=2)
    assert torch.equal(q.data, q2.data)  # reproducible without RNG state


def test_labels_padding_and_state_dict_round_trip():
    q = FIFOQueue(size=8, dim=3, with_labels=True, ddp_gather=False)
    q.enqueue(torch.randn(3, 3), torch.tensor([0, 2, 1]), pad_to=5)
    assert int(q.fill) == 5
    assert q.valid_mask().tolist() == [True, True, True, False, False, False, False, False]
    assert q.labels[:5].tolist() == [0, 2, 1, -1, -1]
    with pytest.raises(ValueError):
        q.enqueue(torch.randn(2, 3))  # labelled queue needs labels
    q.enqueue(torch.randn(4, 3), torch.tensor([1, 1, 0, 2]))
    restored = FIFOQueue(size=8, dim=3, with_labels=True, ddp_gather=False)
    restored.load_state_dict(q.state_dict())
    for name in ("data", "labels", "ptr", "fill", "num_enqueues"):
        assert torch.equal(getattr(restored, name), getattr(q, name)), name
    assert set(q.state_dict()) == {"data", "labels", "ptr", "fill", "num_enqueues"}
    assert torch.equal(restored.valid_mask(), q.valid_mask())
    q.reset()
    assert q.valid_mask().sum() == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        q = FIFOQueue(size=10, dim=2, with_labels=True)
        for step in range(3):  # 3 steps x 2 ranks x 2 rows = 12 rows: wraps around
            x = torch.tensor([[100.0 * step + 10 * rank + i] * 2 for i in range(2)])
            q.enqueue(x, torch.tensor([rank, rank]))
        torch.save(q.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_all_gather_enqueue_identical_queues():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        s0 = torch.load(os.path.join(out_dir, "rank0.pt"))
        s1 = torch.load(os.path.join(out_dir, "rank1.pt"))
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    # rank order per step: rank 0's two rows, then rank 1's
    order = [100.0 * s + 10 * r + i for s in range(3) for r in range(2) for i in range(2)]
    expected = order[10:] + order[2:10]
    assert s0["data"][:, 0].tolist() == expected
    assert int(s0["fill"]) == 10 and int(s0["ptr"]) == 2
    assert s0["labels"].tolist() == [1, 1, 1, 1, 0, 0, 1, 1, 0, 0]
