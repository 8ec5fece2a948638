"""MetaSSL on FixMatch (spec ``specs/metassl.md`` section 7); the shared machinery is ``MetaSSLMixin``."""
from __future__ import annotations

import torch

from nnunet_ssl.algorithms.metassl import softmax_stats
from nnunet_ssl.trainers.budgets import budget_variant
from nnunet_ssl.trainers.nnUNetTrainerFixMatch import nnUNetTrainerFixMatch
from nnunet_ssl.trainers.nnUNetTrainerMetaSSL import MetaSSLMixin, scalars_to_floats


class nnUNetTrainerMetaSSLFixMatch(MetaSSLMixin, nnUNetTrainerFixMatch):
    """MetaSSL on FixMatch: reference = weak view (same network, ``no_grad``), supervised = strong view.

    Labeled images get one (weak) forward, so the labeled reference is ``stop-grad(p_lab)`` and
    ``labeled_regions = "figure"`` (agreement of the reference with y*). The shadow check applies the
    unlabeled rule to the labeled batch: supervised = a no-grad prediction of its strong (intensity-only)
    view, reference = the labeled forward (set ``shadow_strong_view = False`` to save that forward; the
    check then only separates UC from US).
    """

    labeled_regions = "figure"
    shadow_strong_view = True
    # one mean over all valid voxels, not one per region (spec section 13): chosen by issue 18's rule, the best
    # candidate over 3 training seeds on ACDC and LA (benchmarks/results/metassl_default.md); region means made the
    # labeled fit oscillate on LA and cost 10 Dice on ACDC against this
    normalization = "voxel_mean"

    def compute_losses(self, data, target, unlabeled):
        if self.shadow_strong_view:
            strong_l = self.strong_aug(data, self.strong_generator) if self.strong_aug is not None else data
            weak_u, shadow_sup = self.weak_logits(unlabeled, strong_l)  # one no-grad pass
        else:
            (weak_u,), shadow_sup = self.weak_logits(unlabeled), None
        strong_u, ref_u, _ = self.make_strong_view(unlabeled, weak_u)
        out_l, out_s = self.forward_parts(self.network, data, strong_u)
        sup = self.loss(out_l, target)
        z_l = self.full_res(out_l)
        ref_l = z_l.detach()
        l_u, l_l = self.metassl_losses(self.full_res(out_s), ref_u, z_l, ref_l, target,
                                       shadow=None if shadow_sup is None else (shadow_sup, ref_l))
        with torch.no_grad():
            _, pseudo, conf = softmax_stats(ref_u)
        metrics = self.count_metrics(pseudo, conf >= self.threshold)  # pseudo-label histogram, 0.95-mask ratio
        metrics.update(scalars_to_floats(self.metassl_step_metrics(l_u, l_l)))
        return sup, l_u + l_l, metrics


class nnUNetTrainerMetaSSLFixMatch_noLabeledLoss(nnUNetTrainerMetaSSLFixMatch):
    """No L_l (spec section 5): nnU-Net's supervised loss alone on the labeled batch. Hypothesis under test
    (benchmarks/README.md, LA rows): with ``figure`` regions, DC / DS are the few labeled voxels the network gets
    wrong, and the region-mean weights (41-85 per region) give each of them hundreds of times the weight of a
    correct voxel; the labeled fit then oscillates (nnU-Net's pseudo Dice on the training cases) on LA and ACDC.
    Refuted on LA: without L_l the unlabeled term's foreground runs away (see benchmarks/README.md)."""
    use_labeled_loss = False
    normalization = "region_mean"  # the hypothesis is about region means (and its rows were made with them)


class nnUNetTrainerMetaSSLFixMatch_released2dUC(nnUNetTrainerMetaSSLFixMatch):
    """The released 2D scripts' UC masks (UC_fg weight 0, UC_bg 2 w_UC); no MetaSSL-FixMatch script was released."""
    uc_mode = "released_2d"
    normalization = "region_mean"  # as the released scripts


class nnUNetTrainerMetaSSLFixMatch_regionMean(nnUNetTrainerMetaSSLFixMatch):
    """The default before issue 18: each region's CE averaged on its own, so a region's size acts as a class weight
    (the benchmark rows named ``nnUNetTrainerMetaSSLFixMatch`` before that change were made with it)."""
    normalization = "region_mean"


class nnUNetTrainerMetaSSLFixMatch_voxelMean(nnUNetTrainerMetaSSLFixMatch):
    """The default under the name its benchmark rows were measured with (kept so that those rows can be rerun)."""
    normalization = "voxel_mean"


nnUNetTrainerMetaSSLFixMatch_sslTiny = budget_variant(nnUNetTrainerMetaSSLFixMatch, "sslTiny")
nnUNetTrainerMetaSSLFixMatch_sslDemo = budget_variant(nnUNetTrainerMetaSSLFixMatch, "sslDemo")
