"""FixMatch (Sohn et al., NeurIPS 2020) as an nnU-Net trainer.

The unlabeled loader's output (nnU-Net's augmentation pipeline) is the *weak* view. The same network
predicts it under ``no_grad``; its argmax is the hard pseudo-label and its top-1 probability the
confidence. The *strong* view is derived from the weak one on the device, so both share the sampled
spatial transform by construction: per-sample intensity operations (``StrongView``: brightness,
contrast, blur) and then a spatial mix (CutMix by default) whose mask is applied identically to the
image and to the weak-view prediction (hence to the pseudo-labels and confidences). The labeled batch and
the strong view go through one forward pass; the unsupervised loss is the CE toward the pseudo-labels of
the voxels whose confidence reaches ``threshold`` (0.95), averaged over all unlabeled voxels.

Thresholds: ``threshold_mode = "fixed"`` compares the confidence with ``threshold`` (0.95) for every class.
``"adaptive"`` (``nnUNetTrainerFixMatch_adaptive``) compares it with a per-class threshold that follows the
network's own confidence: ``tau_c`` is an EMA (momentum ``adaptive_momentum`` per iteration) of the mean top-1
confidence of the unlabeled voxels predicted as ``c`` (MetaSSL's ``ClassThresholds``), capped at ``threshold``.
With one fixed 0.95 a rare class whose confidence stays below it gets almost no pseudo-labels, while background
passes, and the pseudo-labels drift toward background; the class mean lets roughly the more confident part of
every class through.

Logged per epoch (from counts summed over the epoch): ``mask_ratio`` (fraction of unlabeled voxels at or
above the threshold), ``pl_frac_{c}`` (pseudo-label class histogram), ``mask_ratio_{c}`` (fraction of
the voxels pseudo-labelled ``c`` that pass the threshold), ``conf_frac_{c}`` (share of all unlabeled voxels
that are confidently pseudo-labelled ``c``), ``conf_fg_share`` (foreground share of the confident
pseudo-labels) and, adaptive, ``fixmatch_tau_{c}`` (the thresholds in use at the epoch's end).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nnunet_ssl.algorithms.augment import StrongView
from nnunet_ssl.algorithms.losses.pseudo_label_ce import masked_pseudo_label_ce, pseudo_label_counts
from nnunet_ssl.algorithms.metassl import ClassThresholds, softmax_stats
from nnunet_ssl.algorithms.mixing import ClassMix, CutMix, partner
from nnunet_ssl.trainers.budgets import budget_variant
from nnunet_ssl.trainers.nnUNetTrainerSSL import nnUNetTrainerSSL

#: prefix of the per-step counts that ``finalize_metrics`` turns into ratios
_COUNT = "fm_"


class nnUNetTrainerFixMatch(nnUNetTrainerSSL):
    """FixMatch: masked CE toward the network's own confident pseudo-labels of the weak view, learned on a strong
    (intensity + CutMix) view."""

    use_teacher = False          # the weak view is predicted by the network itself, under no_grad
    lambda_max = 1.0             # FixMatch's lambda_u; the confidence mask replaces a ramp-up
    rampup_fraction = 0.0
    threshold = 0.95             # confidence mask: max softmax >= threshold (the cap of the adaptive thresholds)
    threshold_mode = "fixed"     # "fixed" or "adaptive" (per class, see the module docstring)
    adaptive_init = 0.95         # tau_c before the first update
    adaptive_momentum = 0.99     # EMA weight of the old tau_c, per iteration
    strong_p = 0.5               # probability of each StrongView intensity op per sample; 0 disables them
    mix: Optional[str] = "cutmix"  # "cutmix", "classmix" or None
    cutmix_area = 0.5
    strong_seed: Optional[int] = None  # seed of the strong-view generator (None: drawn from torch's RNG)

    # ------------------------------------------------------------------ modules
    def build_method_modules(self) -> None:
        super().build_method_modules()
        self.strong_aug = StrongView(p=self.strong_p) if self.strong_p > 0 else None
        if self.mix not in (None, "cutmix", "classmix"):
            raise ValueError(f"{self.__class__.__name__}.mix must be 'cutmix', 'classmix' or None, got {self.mix!r}")
        self.mixer = {None: None, "cutmix": CutMix(self.cutmix_area), "classmix": ClassMix()}[self.mix]
        if self.threshold_mode not in ("fixed", "adaptive"):
            raise ValueError(f"{self.__class__.__name__}.threshold_mode must be 'fixed' or 'adaptive', "
                             f"got {self.threshold_mode!r}")
        if self.threshold_mode == "adaptive":  # in ssl_modules: checkpointed and restored with --c
            self.ssl_modules["fm_thresholds"] = ClassThresholds(
                self.label_manager.num_segmentation_heads, init=self.adaptive_init,
                momentum=self.adaptive_momentum, skip_absent=True, tau_max=self.threshold)
        self.strong_generator = self.method_generator(self.strong_seed)  # every DDP rank draws its own views

    # ------------------------------------------------------------------ views
    @torch.no_grad()
    def weak_logits(self, *parts: torch.Tensor) -> List[torch.Tensor]:
        """Full-resolution logits of the network itself on ``parts`` (one no-grad forward)."""
        return [self.full_res(o) for o in self.forward_parts(self.network, *parts)]

    @torch.no_grad()
    def make_strong_view(self, weak: torch.Tensor, weak_logits: torch.Tensor
                         ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Strong view of ``weak`` ``(B, C_in, *S)`` and the weak-view logits aligned with it.

        Intensity operations leave the geometry unchanged; the mix mask (True = content of the partner
        ``(b + 1) mod B``) is applied to the image and to ``weak_logits`` ``(B, C, *S)`` alike, so the
        argmax/confidence of the returned logits are exactly the mixed pseudo-labels/confidences.

        Returns:
            ``(strong_image, reference_logits, mask)``; ``mask`` is None when nothing was mixed.
        """
        strong = self.strong_aug(weak, self.strong_generator) if self.strong_aug is not None else weak
        if self.mixer is None or weak.shape[0] < 2:
            return strong, weak_logits, None
        if isinstance(self.mixer, ClassMix):
            _, labels, _ = softmax_stats(weak_logits)
            mask = partner(self.mixer.class_mask(labels, self.strong_generator))
        else:
            mask = self.mixer.box_mask(weak.shape[0], weak.shape[2:], self.strong_generator, weak.device)
        m = mask[:, None]
        return (torch.where(m, partner(strong), strong), torch.where(m, partner(weak_logits), weak_logits), mask)

    # ------------------------------------------------------------------ loss
    @torch.no_grad()
    def class_thresholds(self, weak_logits: torch.Tensor) -> torch.Tensor:
        """``(C,)`` thresholds of this step; the adaptive ones are first updated from the unmixed weak view
        ``(B, C, *S)``, so every unlabeled voxel counts once (pooled over DDP ranks by ``ClassThresholds``)."""
        if self.threshold_mode == "fixed":
            return torch.full((weak_logits.shape[1],), float(self.threshold), device=weak_logits.device)
        thresholds = self.ssl_modules["fm_thresholds"]
        _, pred, conf = softmax_stats(weak_logits)
        thresholds.update(pred, conf)
        return thresholds.effective().to(weak_logits.device)

    def compute_losses(self, data, target, unlabeled):
        (weak,) = self.weak_logits(unlabeled)
        tau = self.class_thresholds(weak)
        strong, ref, _ = self.make_strong_view(unlabeled, weak)
        with torch.no_grad():
            _, pseudo, conf = softmax_stats(ref)
            confident = conf >= tau[pseudo]
        out_l, out_s = self.forward_parts(self.network, data, strong)
        sup = self.loss(out_l, target)
        unsup = masked_pseudo_label_ce(self.full_res(out_s), pseudo, confident)
        return sup, unsup, self.count_metrics(pseudo, confident)

    def count_metrics(self, pseudo: torch.Tensor, confident: torch.Tensor) -> Dict[str, float]:
        """Mask and histogram counts of one step as floats (one host transfer)."""
        counts = pseudo_label_counts(pseudo, confident, self.label_manager.num_segmentation_heads)
        values = torch.stack(list(counts.values())).tolist()
        return {_COUNT + k: v for k, v in zip(counts, values)}

    # ------------------------------------------------------------------ logging
    def finalize_metrics(self, sums: Dict[str, float], steps: int) -> Dict[str, float]:
        counts = {k[len(_COUNT):]: v for k, v in sums.items() if k.startswith(_COUNT)}
        out = super().finalize_metrics({k: v for k, v in sums.items() if not k.startswith(_COUNT)}, steps)
        out.update(fixmatch_ratios(counts, self.label_manager.num_segmentation_heads))
        if self.threshold_mode == "adaptive":
            tau = self.ssl_modules["fm_thresholds"].effective().tolist()
            out.update({f"fixmatch_tau_{c}": float(t) for c, t in enumerate(tau)})
        return out

    def summary_keys(self) -> Sequence[str]:
        return tuple(super().summary_keys()) + ("mask_ratio",)

    def plot_groups(self) -> Dict[str, List[str]]:
        c = range(self.label_manager.num_segmentation_heads)
        groups = {**super().plot_groups(),
                  "confidence mask (FixMatch)": ["mask_ratio"] + [f"mask_ratio_{i}" for i in c],
                  "pseudo-label class histogram": [f"pl_frac_{i}" for i in c],
                  "confident pseudo-labels per class (share of unlabeled voxels)": [f"conf_frac_{i}" for i in c]
                  + ["conf_fg_share"]}
        if self.threshold_mode == "adaptive":
            groups["class thresholds"] = [f"fixmatch_tau_{i}" for i in c]
        return groups


def fixmatch_ratios(counts: Dict[str, float], num_classes: int) -> Dict[str, float]:
    """Epoch counts (``pseudo_label_counts`` keys, summed) -> ``mask_ratio``, ``pl_frac_c``, ``mask_ratio_c``.

    Empty denominators give NaN; no keys are returned when ``counts`` is empty (e.g. a method that does not
    count).
    """
    if "n_vox" not in counts:
        return {}

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    out = {"mask_ratio": ratio(counts["n_conf"], counts["n_vox"])}
    for c in range(num_classes):
        out[f"pl_frac_{c}"] = ratio(counts[f"n_pl_{c}"], counts["n_vox"])
        out[f"mask_ratio_{c}"] = ratio(counts[f"n_conf_{c}"], counts[f"n_pl_{c}"])
        out[f"conf_frac_{c}"] = ratio(counts[f"n_conf_{c}"], counts["n_vox"])
    out["conf_fg_share"] = ratio(counts["n_conf"] - counts["n_conf_0"], counts["n_conf"])
    return out


class nnUNetTrainerFixMatch_noMix(nnUNetTrainerFixMatch):
    """FixMatch without the spatial mix: the strong view is the intensity operations alone."""
    mix = None


class nnUNetTrainerFixMatch_classMix(nnUNetTrainerFixMatch):
    """FixMatch with ClassMix instead of CutMix as the strong view's spatial mix."""
    mix = "classmix"


class nnUNetTrainerFixMatch_adaptive(nnUNetTrainerFixMatch):
    """FixMatch with per-class thresholds that follow the network's mean confidence per class, capped at 0.95."""
    threshold_mode = "adaptive"


class nnUNetTrainerFixMatch_fixed(nnUNetTrainerFixMatch):
    """FixMatch with one fixed 0.95 threshold for every class (Sohn et al.)."""
    threshold_mode = "fixed"


nnUNetTrainerFixMatch_sslTiny = budget_variant(nnUNetTrainerFixMatch, "sslTiny")
nnUNetTrainerFixMatch_sslDemo = budget_variant(nnUNetTrainerFixMatch, "sslDemo")
