"""Short iteration budgets as named trainer variants (tests, the demo, CPU benchmarks).

nnU-Net sets ``num_epochs`` & co. in ``__init__`` and users pick a budget by trainer name
(``nnUNetTrainer_5epochs``). :func:`budget_variant` builds such a variant for any trainer, so labeled-only
nnU-Net and every SSL trainer can run with an identical budget.
"""
from __future__ import annotations

import sys

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

#: name -> (num_epochs, num_iterations_per_epoch, num_val_iterations_per_epoch, save_every)
BUDGETS = {
    "sslTiny": (2, 3, 1, 50),     # tests: seconds on CPU
    "sslKill": (4, 4, 1, 1),      # interruption tests: a checkpoint after every epoch
    # `nnunet_ssl demo`: minutes on 2 CPU cores. At 12 x 20 the small lesion class ended unlearned (validation Dice
    # < 0.2) in 5 of 20 demo trainings, 3 of 10 labeled-only and 2 of 10 Mean Teacher; at 12 x 40 in 0 of 14.
    "sslDemo": (12, 40, 4, 50),
}


def budget_variant(base: type, budget: str, module: str | None = None) -> type:
    """Subclass ``base`` as ``f"{base.__name__}_{budget}"`` with the epochs/iterations of ``BUDGETS[budget]``.

    The class is registered in ``module`` (default: ``base``'s module) so that pickling, DDP spawn and
    nnU-Net's lookup by name find it.
    """
    epochs, iters, val_iters, save_every = BUDGETS[budget]

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        self.num_iterations_per_epoch = iters
        self.num_val_iterations_per_epoch = val_iters
        self.save_every = save_every

    name = f"{base.__name__}_{budget}"
    module = module or base.__module__
    cls = type(name, (base,), {"__init__": __init__, "__module__": module,
                               "__doc__": f"{base.__name__} with {epochs} epochs x {iters} iterations."})
    setattr(sys.modules[module], name, cls)
    return cls


nnUNetTrainer_sslTiny = budget_variant(nnUNetTrainer, "sslTiny", __name__)
nnUNetTrainer_sslDemo = budget_variant(nnUNetTrainer, "sslDemo", __name__)
