"""Cross Pseudo Supervision (Chen et al., CVPR 2021) as an nnU-Net trainer.

Two networks of the plans' architecture with different initialisations. Each is trained with nnU-Net's
supervised loss on the labeled batch and with the CE toward the *other* network's hard pseudo-labels
(argmax, full resolution, detached) on the unlabeled batch:
``L = L_sup(net1) + L_sup(net2) + lambda(t) * (CE(z1, argmax z2) + CE(z2, argmax z1))``.

``self.network`` is network 1 (nnU-Net's own optimizer, scheduler, validation). Network 2 lives in
``self.ssl_modules["net2"]`` (checkpointed with the SSL state) with nnU-Net's optimizer recipe (SGD,
Nesterov momentum 0.99, PolyLR) registered in ``self.extra_optimizers``, so the base class clips, steps,
schedules and checkpoints it. Under DDP network 2 is wrapped in DDP as nnU-Net wraps ``self.network``;
``torch.compile`` follows nnU-Net's ``_do_i_compile`` for both networks.

``export_network`` (1 or 2) chooses which network's weights become ``network_weights`` (what
``nnUNetv2_predict`` loads) and what the final validation scores.
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_ssl.algorithms.labels import class_argmax
from nnunet_ssl.algorithms.losses.pseudo_label_ce import cross_pseudo_supervision
from nnunet_ssl.trainers.budgets import budget_variant
from nnunet_ssl.trainers.nnUNetTrainerSSL import nnUNetTrainerSSL


class nnUNetTrainerCPS(nnUNetTrainerSSL):
    """Cross Pseudo Supervision: two networks, each trained toward the other's argmax on the unlabeled images."""

    use_teacher = False
    lambda_max = 0.1            # SSL4MIS / MetaSSL CPS scripts: 0.1 with a sigmoid ramp-up
    rampup_fraction = 0.6
    export_network = 1          # 1 or 2: the network saved as 'network_weights'
    net2_seed: Optional[int] = None  # None: network 2 is initialised from torch's RNG state after network 1

    # ------------------------------------------------------------------ second network
    def build_method_modules(self) -> None:
        super().build_method_modules()
        if self.export_network not in (1, 2):
            raise ValueError(f"{self.__class__.__name__}.export_network must be 1 or 2, got {self.export_network}")
        self.ssl_modules["net2"] = self._build_second_network().to(self.device)
        self.network2 = self.ssl_modules["net2"]
        if self._do_i_compile():
            self.print_to_log_file("Using torch.compile for network 2...")
            self.network2 = torch.compile(self.network2)
        # nnU-Net's recipe (configure_optimizers), on network 2's parameters
        optimizer = torch.optim.SGD(self.network2.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        if self.is_ddp:  # as nnU-Net wraps self.network (device_ids only exist for CUDA; CPU/gloo uses None)
            self.network2 = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.network2)
            self.network2 = DDP(self.network2, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        self.extra_optimizers.append((optimizer, scheduler, self.network2))

    def _build_second_network(self) -> nn.Module:
        """The plans' architecture, as nnU-Net's ``initialize`` builds ``self.network``, with its own init."""
        args = (self.plans_manager, self.configuration_manager, self.num_input_channels,
                self.label_manager.num_segmentation_heads, self.enable_deep_supervision)
        if "plans_manager" not in inspect.signature(self.build_network_architecture).parameters:
            cm = self.configuration_manager
            args = (cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
                    *args[2:])
        if self.net2_seed is None:
            # torch's RNG has moved on since network 1 was drawn: a different initialisation. Under DDP the
            # DDP wrapper broadcasts rank 0's weights, as for network 1.
            return self.build_network_architecture(*args)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.net2_seed)
            return self.build_network_architecture(*args)

    @property
    def net2(self) -> nn.Module:
        """Network 2 without DDP / compile wrappers (the module in ``ssl_modules``)."""
        return self.ssl_modules["net2"]

    def set_deep_supervision_enabled(self, enabled: bool):
        super().set_deep_supervision_enabled(enabled)
        if "net2" in self.ssl_modules:
            self.net2.decoder.deep_supervision = enabled

    # ------------------------------------------------------------------ loss
    def compute_losses(self, data, target, unlabeled):
        out1_l, out1_u = self.forward_parts(self.network, data, unlabeled)
        out2_l, out2_u = self.forward_parts(self.network2, data, unlabeled)
        sup1, sup2 = self.loss(out1_l, target), self.loss(out2_l, target)
        z1, z2 = self.full_res(out1_u), self.full_res(out2_u)
        cps1, cps2 = cross_pseudo_supervision(z1, z2)
        with torch.no_grad():
            agree = class_argmax(z1.detach().float()) == class_argmax(z2.detach().float())
            counts = torch.stack([agree.sum().double(), torch.tensor(float(agree.numel()), dtype=torch.float64,
                                                                     device=agree.device)])
            vals = torch.stack([sup1.detach().double(), sup2.detach().double(), cps1.detach().double(),
                                cps2.detach().double(), *counts]).tolist()
        metrics = dict(zip(("sup_loss_1", "sup_loss_2", "cps_loss_1", "cps_loss_2", "cps_n_agree", "cps_n_vox"),
                           vals))
        return sup1 + sup2, cps1 + cps2, metrics

    # ------------------------------------------------------------------ logging
    def finalize_metrics(self, sums: Dict[str, float], steps: int) -> Dict[str, float]:
        n_agree, n_vox = sums.pop("cps_n_agree", None), sums.pop("cps_n_vox", None)
        out = super().finalize_metrics(sums, steps)
        if n_vox is not None:
            out["agreement"] = n_agree / n_vox if n_vox > 0 else float("nan")
        return out

    def summary_keys(self) -> Sequence[str]:
        return tuple(super().summary_keys()) + ("agreement",)

    def plot_groups(self) -> Dict[str, List[str]]:
        return {**super().plot_groups(),
                "per network": ["sup_loss_1", "sup_loss_2", "cps_loss_1", "cps_loss_2"],
                "unlabeled argmax agreement of the two networks": ["agreement"]}

    # ------------------------------------------------------------------ export / checkpoints
    def exported_module(self) -> nn.Module:
        """The unwrapped network whose weights are exported (``export_network``)."""
        return self.net2 if self.export_network == 2 else self.student


class nnUNetTrainerCPS_exportNet2(nnUNetTrainerCPS):
    """CPS that exports (and finally validates) network 2 instead of network 1."""

    export_network = 2


nnUNetTrainerCPS_sslTiny = budget_variant(nnUNetTrainerCPS, "sslTiny")
nnUNetTrainerCPS_sslDemo = budget_variant(nnUNetTrainerCPS, "sslDemo")
