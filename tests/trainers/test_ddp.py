"""DDP: two CPU processes (gloo), each building the trainer inside the process group, a few iterations,
then student, teacher and every piece of SSL state must be identical on both ranks.

Parametrised over every method trainer the package defines (their ``_sslTiny`` variants), so methods
added later are held to the same contract.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_ssl.trainers import all_trainers
from nnunet_ssl.trainers.nnUNetTrainerSSL import nnUNetTrainerSSL

TINY = sorted(n for n, c in all_trainers().items() if n.endswith("_sslTiny") and issubclass(c, nnUNetTrainerSSL))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, port, name, env, out):
    os.environ.update(env)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from pathlib import Path

        from tests.conftest import make_trainer

        pre = Path(env["nnUNet_preprocessed"]) / "Dataset990_SSLSynthetic"
        tr = make_trainer(all_trainers()[name], {"pre": pre}, "3d_fullres", fold=4)
        assert tr.is_ddp and tr.device.type == "cpu"
        tr.on_train_start()
        tr.on_epoch_start()
        tr.on_train_epoch_start()
        outs = [tr.train_step(next(tr.dataloader_train)) for _ in range(2)]
        tr.on_train_epoch_end(outs)
        state = {"student": tr.student.state_dict(), "ssl_modules": tr.ssl_modules.state_dict(),
                 "teacher": tr.teacher.state_dict() if tr.teacher is not None else {},
                 "ssl_iteration": tr.ssl_iteration, "batch_size": tr.batch_size,
                 "unlabeled": next(tr.dataloader_unlabeled)["data"]}
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_ranks_stay_identical(name, dataset3d, tmp_path):
    env = {k: v for k, v in os.environ.items() if k.startswith("nnUNet")}
    mp.spawn(_rank, args=(_free_port(), name, env, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["ssl_iteration"] == r1["ssl_iteration"] == 2
    assert r0["batch_size"] == r1["batch_size"] == 1  # nnU-Net's global batch of 2 split over 2 ranks
    for part in ("student", "teacher", "ssl_modules"):
        assert r0[part].keys() == r1[part].keys()
        for k in r0[part]:
            torch.testing.assert_close(r0[part][k], r1[part][k], rtol=0, atol=0, msg=f"{part}.{k} differs")
    # each rank draws its own unlabeled patches (whole patches compared: a single voxel, e.g. a corner in the
    # constant background, can coincide by chance)
    assert r0["unlabeled"].shape == r1["unlabeled"].shape
    assert not torch.equal(r0["unlabeled"], r1["unlabeled"])
