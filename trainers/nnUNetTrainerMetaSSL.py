"""MetaSSL (Zhao et al., IEEE TMI 2025) on Mean Teacher, FixMatch and CPS; spec: ``specs/metassl.md``.

MetaSSL keeps the way a base method produces its *reference* prediction and replaces its unsupervised loss
with a spatially heterogeneous CE toward the reference's argmax: every voxel falls into one of four regions
(unanimous/discrepant x confident/suspicious against per-class adaptive thresholds), each region is averaged
on its own and scaled by a fixed weight. The same region-weighted CE is applied to labeled images against
the ground truth. Total: ``L = L_sup + lambda(t) * (L_l + L_u)`` with nnU-Net's supervised loss unchanged
and the heterogeneous terms on the full-resolution output only (section 10).

- ``nnUNetTrainerMetaSSL``: reference = EMA teacher (decay 0.99 with warm-up), supervised = student; the
  teacher sees the same input as the student (section 7) and one teacher forward covers both batches.
- ``nnUNetTrainerMetaSSLFixMatch`` (own file): reference = the network on the weak view (``no_grad``), supervised = the
  strong view; CutMix mixes the weak-view logits with the image, so pseudo-labels and confidences stay
  voxel-aligned. ``labeled_regions = "figure"`` (the ``released`` variant is degenerate here, section 7).
- ``nnUNetTrainerMetaSSLCPS`` (own file): both directions; net k learns argmax of the other net, tau sets ``1_u, 2_u,
  1_l, 2_l``; diagnostics carry suffixes ``_1`` / ``_2``.
- ``nnUNetTrainerMetaSSLBCP`` (own file): reference = the EMA teacher on BCP's clean patches, pasted with BCP's box;
  supervised = the student on the mixed images; ``L_u`` on the pseudo-labeled regions, ``L_l`` on the labeled ones.

All of them share :class:`MetaSSLMixin` (loss construction from class attributes, diagnostics accumulation,
threshold logging, ``metassl_diagnostics.jsonl``, plots). The pure-torch parts are
``nnunet_ssl.algorithms.metassl``.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from batchgenerators.utilities.file_and_folder_operations import join

from nnunet_ssl.algorithms.metassl import MetaSSLLoss, RegionCounter, loss_preset
from nnunet_ssl.algorithms.perturb import clipped_gaussian_noise
from nnunet_ssl.progress import SSLProgressLog
from nnunet_ssl.trainers.budgets import budget_variant
from nnunet_ssl.trainers.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher

DIAGNOSTICS_FILE = "metassl_diagnostics.jsonl"
_KINDS = ("u", "l", "shadow")


def scalars_to_floats(values: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """0-dim tensors -> floats with a single host transfer."""
    if not values:
        return {}
    return dict(zip(values, torch.stack([v.detach().double().reshape(()) for v in values.values()]).tolist()))


class MetaSSLMixin:
    """The MetaSSL machinery every MetaSSL trainer shares; put it first in the bases.

    A trainer's ``compute_losses`` computes its supervised and reference logits and calls
    :meth:`metassl_losses` once per direction. The mixin owns the ``MetaSSLLoss`` (in
    ``ssl_modules["metassl"]``, so every tau set is checkpointed), sums the per-region counts of each epoch
    (committed after successful optimizer steps only, all-reduced under DDP at epoch end), logs
    ``u_frac_R``/``u_ce_R``/``u_wterm_R``/``u_fgfrac_R``, ``u_fg_weight``, ``l_*``,
    ``shadow_acc_R``/``shadow_frac_R``, ``tau_{set}_{c}``, ``metassl_L_u``/``metassl_L_l`` and lambda, writes
    ``metassl_diagnostics.jsonl`` (one JSON object per epoch, rewritten atomically from the checkpointed log, so a
    resumed run never duplicates an epoch) and prints a one-line summary.
    """

    # weight of L_l + L_u: lambda(t) = lambda_max * exp(-5 (1 - min(t / (f T), 1))^2) (section 6)
    lambda_max = 0.1
    rampup_fraction = 0.6
    # region weights (section 4): preset + per-key overrides {"UC", "US", "DC", "DS"}
    weights_preset = "paper"
    w_unlabeled: Optional[Dict[str, float]] = None
    w_labeled: Optional[Dict[str, float]] = None
    split_uc = True
    # section 13: "split" | "released_2d" | "joint" (None: from split_uc) and "region_mean" | "voxel_mean"
    uc_mode: Optional[str] = None
    normalization = "region_mean"
    # a released script's loss (LOSS_PRESETS name), or {spatial dims: name} for the scripts of each dimension; it
    # replaces weights_preset, uc_mode, normalization and labeled_regions; metassl_overrides then apply on top
    metassl_preset: Union[None, str, Dict[int, str]] = None
    metassl_overrides: Optional[Dict[str, object]] = None
    # adaptive class thresholds (section 2.2)
    tau_init = 0.9
    tau_momentum = 0.5
    tau_max: Optional[float] = None
    tau_skip_absent = True
    # labeled variant (section 5)
    labeled_regions = "released"
    use_labeled_loss = True
    # diagnostics suffix per direction ("" for one direction, ("_1", "_2") for CPS) and the tau sets to create
    metassl_directions: Tuple[str, ...] = ("",)
    metassl_tau_sets: Optional[Tuple[str, ...]] = None

    # ------------------------------------------------------------------ modules
    def metassl_loss_options(self) -> Dict[str, object]:
        """The ``MetaSSLLoss`` keyword arguments of the region definition and weighting (class attributes, then
        ``metassl_preset`` for this configuration's dimension, then ``metassl_overrides``)."""
        options: Dict[str, object] = dict(
            weights_preset=self.weights_preset, normalization=self.normalization, labeled_regions=self.labeled_regions,
            **({"uc_mode": self.uc_mode} if self.uc_mode is not None else {"split_uc": self.split_uc}))
        preset = self.metassl_preset
        if isinstance(preset, Mapping):
            dim = len(self.configuration_manager.patch_size)
            if dim not in preset:
                raise ValueError(f"{type(self).__name__}.metassl_preset has no entry for {dim}D configurations "
                                 f"({self.configuration_name}); it covers {sorted(preset)}")
            preset = preset[dim]
        if preset is not None:
            options.pop("split_uc", None)
            options.update(loss_preset(preset))
        options.update(self.metassl_overrides or {})
        return options

    def build_method_modules(self) -> None:
        super().build_method_modules()
        self.ssl_modules["metassl"] = MetaSSLLoss(
            self.label_manager.num_segmentation_heads, w_unlabeled=self.w_unlabeled, w_labeled=self.w_labeled,
            tau_init=self.tau_init, tau_momentum=self.tau_momentum, tau_max=self.tau_max,
            tau_skip_absent=self.tau_skip_absent, tau_sets=self.metassl_tau_sets, **self.metassl_loss_options())
        regions = self.metassl.regions
        # without L_l there are no labeled regions to count (their columns would be NaN throughout)
        kinds = [k for k in _KINDS if k != "l" or self.use_labeled_loss]
        self._metassl_counters = {kind + sfx: RegionCounter(kind, regions, sfx)
                                  for sfx in self.metassl_directions for kind in kinds}
        self._metassl_pending: List[Tuple[str, Dict[str, torch.Tensor]]] = []
        self._metassl_keys: List[str] = []
        m = self.metassl
        self.print_to_log_file(
            f"MetaSSL: preset={self.metassl_preset}, weights_preset={m.weights_preset}, uc_mode={m.uc_mode}, "
            f"normalization={m.normalization}, region weights unlabeled {m.region_weights_unlabeled}, labeled "
            f"{m.region_weights_labeled}, labeled_regions={m.labeled_regions}, "
            f"use_labeled_loss={self.use_labeled_loss}, tau sets {list(m.sets)} (init {self.tau_init}, momentum "
            f"{self.tau_momentum}, tau_max {self.tau_max}, skip_absent {self.tau_skip_absent}), "
            f"lambda_max={self.lambda_max}, rampup_fraction={self.rampup_fraction}")

    @property
    def metassl(self) -> MetaSSLLoss:
        return self.ssl_modules["metassl"]

    @property
    def metassl_ignore_label(self) -> Optional[int]:
        return self.label_manager.ignore_label if self.label_manager.has_ignore_label else None

    # ------------------------------------------------------------------ the loss of one direction
    def metassl_losses(self, sup_u: torch.Tensor, ref_u: torch.Tensor, sup_l: torch.Tensor, ref_l: torch.Tensor,
                       target, suffix: str = "", u_set: str = "ref_u", sup_l_set: str = "sup_l",
                       ref_l_set: str = "ref_l", shadow: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                       u_valid: Optional[torch.Tensor] = None, u_target: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(L_u, L_l)`` of one direction, updating its tau sets; queues the diagnostics of this step.

        Args:
            sup_u, ref_u: ``(B_u, C, *S)`` full-resolution supervised / reference logits on the unlabeled batch.
            sup_l, ref_l: ``(B_l, C, *S)`` the same on the labeled batch.
            target: nnU-Net's target (list under deep supervision; full resolution is used).
            suffix: diagnostics key suffix of this direction.
            u_set: the reference's unlabeled tau set (updated here; also the shadow check's set).
            sup_l_set, ref_l_set: labeled tau sets of the ``released`` / ``figure`` variants.
            shadow: ``(supervised, reference)`` labeled logits for the shadow check when they differ from
                ``(sup_l, ref_l)`` (FixMatch: strong-view and weak-view predictions).
            u_valid, u_target: ``valid`` and ``target`` of ``MetaSSLLoss.unlabeled_loss`` (BCP: the
                pseudo-labeled region and its LCC-filtered pseudo-label); ``None``: every voxel, ``argmax ref_u``.
        """
        target = target[0] if isinstance(target, (list, tuple)) else target
        ignore = self.metassl_ignore_label
        l_u, s_u = self.metassl.unlabeled_loss(sup_u, ref_u, tau_set=u_set, valid=u_valid, target=u_target)
        pending = [("u" + suffix, s_u)]
        if self.use_labeled_loss:
            l_l, s_l = self.metassl.labeled_loss(sup_l, ref_l, target, ignore, sup_set=sup_l_set, ref_set=ref_l_set)
            pending.append(("l" + suffix, s_l))
        else:
            l_l = sup_l.new_zeros((), dtype=torch.float32)
        sh_sup, sh_ref = shadow if shadow is not None else (sup_l, ref_l)
        pending.append(("shadow" + suffix, self.metassl.shadow_diagnostics(sh_sup, sh_ref, target, ignore, u_set)))
        self._metassl_pending.extend(pending)
        return l_u, l_l

    def metassl_step_metrics(self, l_u: torch.Tensor, l_l: torch.Tensor, suffix: str = "") -> Dict[str, torch.Tensor]:
        # lambda * L_l per step: lambda varies within an epoch, so the epoch ratio needs the per-step product
        return {f"metassl_L_u{suffix}": l_u, f"metassl_L_l{suffix}": l_l,
                f"metassl_lamL_l{suffix}": self.unsup_weight() * l_l.detach()}

    # ------------------------------------------------------------------ epoch bookkeeping
    def train_step(self, batch: dict) -> dict:
        self._metassl_pending = []  # a skipped (non-finite) step must not leak its stats into the next one
        return super().train_step(batch)

    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        # only steps that were taken count (a non-finite step is skipped before this hook)
        for key, stats in self._metassl_pending:
            self._metassl_counters[key].add(stats)
        self._metassl_pending = []

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        for counter in self._metassl_counters.values():
            counter.reset()
        self._metassl_pending = []

    def finalize_metrics(self, sums: Dict[str, float], steps: int) -> Dict[str, float]:
        out = super().finalize_metrics(sums, steps)
        metassl: Dict[str, float] = {}
        for counter in self._metassl_counters.values():
            counter.all_reduce(self.device)  # a collective: every rank finalizes every epoch
            metassl.update(counter.summary())
        metassl.update(self.metassl.threshold_diagnostics())
        # spec section 13.3: how much of the step L_l takes. nnU-Net's loss is CE - soft Dice; + 1 per network
        # makes it CE + (1 - soft Dice) >= 0, so the ratio neither changes sign nor explodes near L_sup = 0
        lam_l = sum(out.get(f"metassl_lamL_l{sfx}", 0.0) for sfx in self.metassl_directions)
        shifted_sup = out.get("sup_loss", float("nan")) + len(self.metassl_directions)
        metassl["metassl_lamLl_over_sup"] = lam_l / shifted_sup if shifted_sup > 0 else float("nan")
        out.update(metassl)
        self._metassl_keys = sorted(set(metassl) | {k for k in out if k.startswith("metassl_")} | {"lambda"})
        return out

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        self.print_to_log_file(self.metassl_summary_line())

    def metassl_summary_line(self) -> str:
        """One line: lambda, L_u, L_l, unlabeled region fractions, shadow accuracies, thresholds."""
        def last(key: str) -> float:
            series = self.ssl_log.values.get(key)
            return series[-1] if series else float("nan")

        regions = self.metassl.regions
        parts = [f"lambda {last('lambda'):.4g}"]
        for sfx in self.metassl_directions:
            head = f"[{sfx.strip('_')}] " if sfx else ""
            parts.append(head + f"L_u {last('metassl_L_u' + sfx):.4g} L_l {last('metassl_L_l' + sfx):.4g}")
            parts.append("u_frac " + " ".join(f"{r} {last(f'u_frac_{r}{sfx}'):.3f}" for r in regions))
            parts.append(f"u_fg_weight {last('u_fg_weight' + sfx):.3g}")
            parts.append("shadow_acc " + " ".join(f"{r} {last(f'shadow_acc_{r}{sfx}'):.3f}" for r in regions))
        parts.append(f"lambda*L_l/(L_sup+1) {last('metassl_lamLl_over_sup'):.3g}")
        for name in self.metassl.sets:
            taus = " ".join(f"{last(f'tau_{name}_{c}'):.3f}" for c in range(self.metassl.num_classes))
            parts.append(f"tau_{name} ({taus})")
        return "MetaSSL: " + " | ".join(parts)

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.local_rank == 0:
            self.write_metassl_diagnostics(join(self.output_folder, DIAGNOSTICS_FILE))

    def write_metassl_diagnostics(self, path: str) -> None:
        """Rewrite ``path`` with one JSON object per epoch (the MetaSSL keys of the SSL log), atomically."""
        log = SSLProgressLog()
        log.values = {k: v for k, v in self.ssl_log.values.items() if k in self._metassl_keys}
        log.write_jsonl(path)

    def summary_keys(self) -> Sequence[str]:
        return tuple(super().summary_keys()) + tuple(
            k for sfx in self.metassl_directions for k in (f"metassl_L_u{sfx}", f"metassl_L_l{sfx}"))

    def plot_groups(self) -> Dict[str, List[str]]:
        groups = dict(super().plot_groups())
        regions = self.metassl.regions
        for sfx in self.metassl_directions:
            groups[f"MetaSSL unlabeled region fractions{sfx}"] = [f"u_frac_{r}{sfx}" for r in regions]
            groups[f"MetaSSL foreground share of each unlabeled region{sfx}"] = [f"u_fgfrac_{r}{sfx}"
                                                                              for r in regions]
            groups[f"MetaSSL shadow accuracy of the reference (labeled){sfx}"] = [f"shadow_acc_{r}{sfx}"
                                                                               for r in regions]
        groups["MetaSSL losses"] = [f"metassl_L_{p}{sfx}" for sfx in self.metassl_directions for p in ("u", "l")]
        groups["lambda L_l / (L_sup + 1)"] = ["metassl_lamLl_over_sup"]
        groups["MetaSSL thresholds"] = [f"tau_{name}_{c}" for name in self.metassl.sets
                                        for c in range(self.metassl.num_classes)]
        return groups


# ---------------------------------------------------------------------------------------------- Mean Teacher
class nnUNetTrainerMetaSSL(MetaSSLMixin, nnUNetTrainerMeanTeacher):
    """MetaSSL on Mean Teacher: reference = EMA teacher (0.99, warm-up), supervised = student."""

    ema_decay = 0.99
    noise_std = 0.0  # section 7: the teacher sees the same input as the student; > 0 adds MT's student noise
    # the released scripts' region weights of the configuration's dimension, UC split, one mean over all valid
    # voxels (spec section 13): chosen by issue 18's rule, the only Mean Teacher candidate with 3 training seeds on
    # ACDC and LA (benchmarks/results/metassl_default.md); the paper defaults it replaces (_paper) weigh a
    # confident-foreground voxel ~31 times a background one through the region means and lost 27 Dice on ACDC
    metassl_preset = {2: "released_mt_2d", 3: "released_3d"}
    metassl_overrides = {"uc_mode": "split", "normalization": "voxel_mean"}

    def compute_losses(self, data, target, unlabeled):
        with torch.no_grad():  # one teacher pass on both batches (the released variant needs the labeled part)
            t_l, t_u = [self.full_res(o) for o in self.forward_parts(self.teacher, data, unlabeled)]
        student_u = clipped_gaussian_noise(unlabeled, self.noise_std, self.noise_clip) if self.noise_std > 0 \
            else unlabeled
        out_l, out_u = self.forward_parts(self.network, data, student_u)
        sup = self.loss(out_l, target)
        l_u, l_l = self.metassl_losses(self.full_res(out_u), t_u, self.full_res(out_l), t_l, target)
        return sup, l_u + l_l, scalars_to_floats(self.metassl_step_metrics(l_u, l_l))


# ---------------------------------------------------------------------------------------------- variants
class nnUNetTrainerMetaSSL_paper(nnUNetTrainerMetaSSL):
    """The default before issue 18: the spec's paper weights, UC split, each region's CE averaged on its own, so a
    region's size acts as a class weight (the benchmark rows named ``nnUNetTrainerMetaSSL`` before that change were
    made with it)."""
    metassl_preset = None
    metassl_overrides = None


class nnUNetTrainerMetaSSL_released3d(nnUNetTrainerMetaSSL):
    """The released MT-3D script's loss in any dimension (3D weights, UC split, region means)."""
    metassl_preset = "released_3d"
    metassl_overrides = None


class nnUNetTrainerMetaSSL_released(nnUNetTrainerMetaSSL):
    """The loss the authors ran: the released MT-2D script's for 2D configurations (UC_fg weight 0, UC_bg 2 w_UC),
    the MT-3D script's for 3D ones (spec section 13)."""
    metassl_overrides = None


class nnUNetTrainerMetaSSL_voxelMean(nnUNetTrainerMetaSSL):
    """The default under the name its benchmark rows were measured with (kept so that those rows can be rerun): the
    released weights of the dimension, one mean over all voxels instead of one per region."""


# the variants below test hypotheses about the paper defaults, and their rows were made with them
class nnUNetTrainerMetaSSL_uniform(nnUNetTrainerMetaSSL_paper):
    """MetaSSL on Mean Teacher with uniform region weights (region means without heterogeneity)."""
    weights_preset = "uniform"


class nnUNetTrainerMetaSSL_figure(nnUNetTrainerMetaSSL_paper):
    """MetaSSL on Mean Teacher with the figure's labeled regions (agreement of the reference with the ground truth)."""
    labeled_regions = "figure"


class nnUNetTrainerMetaSSL_noSplitUC(nnUNetTrainerMetaSSL_paper):
    """UC as one region (spec section 2). With the split, each confident-foreground voxel weighs |UC_bg| / |UC_fg|
    times a confident-background one; on ACDC at 3 labeled patients the foreground then grew on unseen images
    (diagnosis in benchmarks/README.md, "What the ACDC CPU rows show so far"). This variant tests that explanation."""
    split_uc = False


class nnUNetTrainerMetaSSL_noise(nnUNetTrainerMetaSSL_paper):
    """The student sees Mean Teacher's clipped Gaussian noise on the unlabeled batch; the teacher sees the clean one.
    Hypothesis under test (benchmarks/README.md): released MetaSSL-MT perturbs nothing, so student and EMA teacher
    agree on their own false positives and UC reinforces them; MetaSSL on FixMatch (strong view for the student) did
    not drift on ACDC. This variant asks whether a perturbation alone is enough."""
    noise_std = nnUNetTrainerMeanTeacher.noise_std


nnUNetTrainerMetaSSL_sslTiny = budget_variant(nnUNetTrainerMetaSSL, "sslTiny")
nnUNetTrainerMetaSSL_sslDemo = budget_variant(nnUNetTrainerMetaSSL, "sslDemo")
