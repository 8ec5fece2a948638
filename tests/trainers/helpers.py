"""In-process trainer driving for tests: a few iterations, one epoch, snapshots."""
from __future__ import annotations

import torch


def state_copy(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"state entry {k} differs")


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def start(trainer):
    """Initialise and build loaders (no training yet)."""
    trainer.on_train_start()
    return trainer


def steps(trainer, n: int) -> list:
    trainer.on_train_epoch_start()
    return [trainer.train_step(next(trainer.dataloader_train)) for _ in range(n)]


def one_epoch(trainer) -> None:
    """Exactly what nnUNetTrainer.run_training does for one epoch."""
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    outs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
    trainer.on_train_epoch_end(outs)
    with torch.no_grad():
        trainer.on_validation_epoch_start()
        vals = [trainer.validation_step(next(trainer.dataloader_val))
                for _ in range(trainer.num_val_iterations_per_epoch)]
        trainer.on_validation_epoch_end(vals)
    trainer.on_epoch_end()
