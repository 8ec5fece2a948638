"""MetaSSL on CPS, both directions (spec ``specs/metassl.md`` section 7); the shared machinery is ``MetaSSLMixin``."""
from __future__ import annotations

from typing import Dict, List

import torch

from nnunet_ssl.algorithms.metassl import softmax_stats
from nnunet_ssl.trainers.budgets import budget_variant
from nnunet_ssl.trainers.nnUNetTrainerCPS import nnUNetTrainerCPS
from nnunet_ssl.trainers.nnUNetTrainerMetaSSL import MetaSSLMixin, scalars_to_floats


class nnUNetTrainerMetaSSLCPS(MetaSSLMixin, nnUNetTrainerCPS):
    """MetaSSL on CPS, both directions: net k is supervised toward argmax of the other net.

    Direction 1 (net 1 learns from net 2): unlabeled regions from agreement(y1, y2) and net 2's
    confidence vs ``tau_2_u``; labeled ``released``: own confidence vs ``tau_1_l``, ``figure``: net 2's
    confidence vs ``tau_2_l``. Direction 2 mirrors it. ``L = sum_k [L_sup(k) + lambda (L_l(k) + L_u(k))]``.
    """

    metassl_directions = ("_1", "_2")
    metassl_tau_sets = ("1_u", "2_u", "1_l", "2_l")

    def compute_losses(self, data, target, unlabeled):
        out1_l, out1_u = self.forward_parts(self.network, data, unlabeled)
        out2_l, out2_u = self.forward_parts(self.network2, data, unlabeled)
        sup1, sup2 = self.loss(out1_l, target), self.loss(out2_l, target)
        z1_u, z2_u, z1_l, z2_l = (self.full_res(o) for o in (out1_u, out2_u, out1_l, out2_l))
        l_u1, l_l1 = self.metassl_losses(z1_u, z2_u, z1_l, z2_l, target, suffix="_1", u_set="2_u",
                                         sup_l_set="1_l", ref_l_set="2_l")
        l_u2, l_l2 = self.metassl_losses(z2_u, z1_u, z2_l, z1_l, target, suffix="_2", u_set="1_u",
                                         sup_l_set="2_l", ref_l_set="1_l")
        with torch.no_grad():
            # the regions' own argmax (of the float32 softmax): argmax of the raw logits differs where two logits
            # round to the same probability, which made agreement and UC + US disagree by a few voxels
            agree = softmax_stats(z1_u.detach())[1] == softmax_stats(z2_u.detach())[1]
        scalars = {"sup_loss_1": sup1, "sup_loss_2": sup2, **self.metassl_step_metrics(l_u1, l_l1, "_1"),
                   **self.metassl_step_metrics(l_u2, l_l2, "_2"), "cps_n_agree": agree.sum(),
                   "cps_n_vox": torch.tensor(agree.numel(), device=agree.device)}
        return sup1 + sup2, l_u1 + l_l1 + l_u2 + l_l2, scalars_to_floats(scalars)

    def plot_groups(self) -> Dict[str, List[str]]:
        groups = super().plot_groups()
        groups["per network"] = ["sup_loss_1", "sup_loss_2"]
        return groups


class nnUNetTrainerMetaSSLCPS_released(nnUNetTrainerMetaSSLCPS):
    """The loss the authors ran: the released CPS-2D script's for 2D configurations (exp weights, UC_fg weight 0,
    UC_bg 2 w_UC), the CPS-3D script's for 3D ones (spec section 13)."""
    metassl_preset = {2: "released_cps_2d", 3: "released_3d"}


class nnUNetTrainerMetaSSLCPS_voxelMean(nnUNetTrainerMetaSSLCPS_released):
    """The released weights of the dimension with one mean over all voxels instead of one per region."""
    metassl_overrides = {"uc_mode": "split", "normalization": "voxel_mean"}


nnUNetTrainerMetaSSLCPS_sslTiny = budget_variant(nnUNetTrainerMetaSSLCPS, "sslTiny")
nnUNetTrainerMetaSSLCPS_sslDemo = budget_variant(nnUNetTrainerMetaSSLCPS, "sslDemo")
