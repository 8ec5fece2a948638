"""MetaSSL's spatially heterogeneous loss (Zhao et al., IEEE TMI 2025), pure torch.

The spec is ``specs/metassl.md``; section numbers below refer to it. Every voxel is put in one of four
regions from two binary questions: do the supervised prediction ``p`` and the reference prediction
``p~`` agree on the argmax (unanimous / discrepant), and is the confidence above a per-class adaptive
threshold (confident / suspicious)? Each region's cross-entropy is averaged on its own and scaled by a
fixed weight, so reliable regions dominate and unreliable ones are down-weighted, not discarded.

Layout: logits are ``(B, C, *spatial)`` with the class axis at dim 1 and ``spatial`` = ``(H, W)`` or
``(D, H, W)``; hard maps and masks are ``(B, *spatial)``. Nothing depends on the number of spatial
dimensions, the batch size or the number of classes. Region names are ``"UCfg", "UCbg", "US", "DC",
"DS"`` (``split_uc=True``, the default) or ``"UC", "US", "DC", "DS"``; weights are keyed ``"UC", "US",
"DC", "DS"`` and both UC halves use ``"UC"``.

Public API (what the trainers call):

- ``WEIGHT_PRESETS[name] -> {"unlabeled": {UC, US, DC, DS}, "labeled": {...}}`` for ``paper``
  (default), ``released_mt``, ``released_3d``, ``uniform`` (section 4).
- ``power_weights(w, r, gamma) -> dict`` and ``exp_weights(w, r, gamma) -> dict``: the two released
  generating formulas; the released labeled power formula is ``power_weights(w, r_l, 1.0)``.
- ``resolve_weights(preset="paper", w_unlabeled=None, w_labeled=None) -> (dict, dict)``.
- ``metassl_lambda(t, total, lambda_max=0.1, rampup_fraction=0.6) -> float``: lambda(t) (section 6).
- ``region_names(split_uc=True) -> tuple[str, ...]``; ``UC_MODES``, ``NORMALIZATIONS``.
- ``region_weights(weights, uc_mode) -> dict``: per-region weights (``released_2d``: UCfg 0, UCbg 2 w_UC).
- ``LOSS_PRESETS[name]`` / ``loss_preset(name) -> dict`` of ``MetaSSLLoss`` keyword arguments that reproduce a
  released script's effective loss: ``released_mt_2d``, ``released_cps_2d``, ``released_3d`` (section 13).
- ``softmax_stats(logits) -> (probs, argmax, maxprob)``, float32, autocast off.
- ``ClassThresholds(num_classes, init=0.9, momentum=0.5, skip_absent=True, tau_max=None)``:
  one tau set; ``update(pred, conf, valid=None)``, ``update_from_logits(logits, valid=None)``,
  ``effective() -> (C,)``.
- ``quadripartition(pred_a, pred_b, conf, conf_pred, tau, valid=None, split_uc=True) -> dict[str, mask]``.
- ``region_weighted_ce(logits, target, regions, weights, normalization="region_mean") -> (loss, stats)``.
- ``MetaSSLLoss(num_classes, weights_preset="paper", ..., uc_mode=None, normalization="region_mean",
  tau_sets=None)`` (an ``nn.Module`` whose
  state_dict holds every tau set): ``unlabeled_loss(sup_logits, ref_logits, tau_set="ref_u",
  update=True, valid=None, target=None)``, ``labeled_loss(sup_logits, ref_logits, target, ignore_label=None,
  sup_set="sup_l", ref_set="ref_l", update=True)``, ``shadow_diagnostics(sup_logits, ref_logits,
  target, ignore_label=None, tau_set="ref_u")``, ``threshold_set(name)``, ``threshold_diagnostics()``.
- ``RegionCounter(kind, regions, suffix="")``: sums the stats dicts of one epoch, ``all_reduce()``s
  them under DDP and turns them into the logged keys (``u_frac_R``, ``u_ce_R``, ``u_wterm_R``,
  ``l_*``, ``shadow_acc_R``, ``shadow_frac_R``).

Typical use (Mean Teacher; CPS uses sets ``"1_u", "2_u", "1_l", "2_l"`` and calls each method once per
direction, section 7)::

    metassl = MetaSSLLoss(num_classes=C).to(device)
    l_u, s_u = metassl.unlabeled_loss(student_u[0], teacher_u[0])          # tau set "ref_u"
    l_l, s_l = metassl.labeled_loss(student_l[0], teacher_l[0], target[0], ignore_label)
    loss = sup_loss + lam * (l_l + l_u)
    u_counter.add(s_u); l_counter.add(s_l)

Precision: softmax, log-softmax, argmax, max and every threshold comparison run in float32 with autocast
disabled, because half-precision ties and rounding flip regions and the log of fp16 probabilities
underflows (section 10). Losses are float32 scalars and join nnU-Net's scaled loss as usual.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from nnunet_ssl.algorithms.distributed import all_reduce_sum
from nnunet_ssl.algorithms.labels import class_max
from nnunet_ssl.algorithms.schedules import sigmoid_rampup

WEIGHT_KEYS: tuple[str, ...] = ("UC", "US", "DC", "DS")
REGIONS_SPLIT: tuple[str, ...] = ("UCfg", "UCbg", "US", "DC", "DS")
REGIONS_NO_SPLIT: tuple[str, ...] = ("UC", "US", "DC", "DS")
LABELED_REGION_VARIANTS: tuple[str, ...] = ("released", "figure")
# How confidently agreed voxels (UC) are weighted (section 13): "split" = UC_fg and UC_bg two regions, both w_UC
# (the 3D scripts); "released_2d" = UC_fg weight 0, UC_bg 2 w_UC (the 2D scripts, whose foreground mask equals the
# background one); "joint" = one UC region.
UC_MODES: tuple[str, ...] = ("split", "released_2d", "joint")
# "region_mean": each region's CE averaged on its own (section 3); "voxel_mean": one mean over all valid voxels
# with per-voxel weight w_R, so region sizes no longer act as class weights (section 13).
NORMALIZATIONS: tuple[str, ...] = ("region_mean", "voxel_mean")


# ----------------------------------------------------------------------------------------------
# Region weights (section 4)
# ----------------------------------------------------------------------------------------------
def power_weights(w: float, r: float, gamma: float) -> dict[str, float]:
    """The released "power" weights: ``UC = w, US = w/r, DS = w/(r^2 gamma), DC = w/(r^3 gamma^3)``.

    The released labeled formula ``w / r_l^k`` with ``k = 0, 1, 2, 3`` for UC, US, DS, DC is the same
    expression with ``gamma = 1``: ``power_weights(w, r_l, 1.0)``.

    Args:
        w: weight of UC.
        r: ratio between consecutive regions (> 0).
        gamma: extra decay of the discrepant regions (> 0).

    Returns:
        ``{"UC", "US", "DC", "DS"} -> float``. Note that DC < DS here (the MT and 3D scripts' order).
    """
    if r <= 0 or gamma <= 0:
        raise ValueError(f"power_weights needs r > 0 and gamma > 0, got r={r}, gamma={gamma}")
    return {
        "UC": float(w),
        "US": float(w / r),
        "DC": float(w / (r**3 * gamma**3)),
        "DS": float(w / (r**2 * gamma)),
    }


def exp_weights(w: float, r: float, gamma: float) -> dict[str, float]:
    """The released "exp" weights (CPS-2D): ``w * exp(-(k r)^gamma)`` with ``k = 0, 1, 2, 3`` for UC, US, DC, DS.

    Args:
        w: weight of UC.
        r: decay rate (>= 0).
        gamma: exponent (> 0).

    Returns:
        ``{"UC", "US", "DC", "DS"} -> float``, decreasing in that order (the abstract's order).
    """
    if r < 0 or gamma <= 0:
        raise ValueError(f"exp_weights needs r >= 0 and gamma > 0, got r={r}, gamma={gamma}")
    return {key: float(w * math.exp(-((k * r) ** gamma))) for k, key in enumerate(WEIGHT_KEYS)}


# Built from the generating formulas so the presets reproduce the released scripts to the last bit,
# rather than to the 3-4 digits printed in the spec's table.
WEIGHT_PRESETS: dict[str, dict[str, dict[str, float]]] = {
    "paper": {"unlabeled": exp_weights(50.0, 0.6, 3.0), "labeled": exp_weights(85.0, 0.3, 3.0)},
    "released_mt": {"unlabeled": power_weights(50.0, 1.25, 5.0), "labeled": power_weights(50.0, 1.4, 1.0)},
    "released_3d": {"unlabeled": power_weights(50.0, 1.25, 5.0), "labeled": power_weights(50.0, 1.5, 1.0)},
    "uniform": {"unlabeled": dict.fromkeys(WEIGHT_KEYS, 50.0), "labeled": dict.fromkeys(WEIGHT_KEYS, 50.0)},
}


def _override(base: dict[str, float], override: Mapping[str, float] | None, what: str) -> dict[str, float]:
    out = dict(base)
    for key, value in (override or {}).items():
        if key not in WEIGHT_KEYS:
            raise ValueError(f"unknown {what} region weight {key!r}; valid keys are {list(WEIGHT_KEYS)}")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what} region weight {key!r} must be finite and >= 0, got {value}")
        out[key] = value
    return out


def resolve_weights(
    preset: str = "paper",
    w_unlabeled: Mapping[str, float] | None = None,
    w_labeled: Mapping[str, float] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Region weights of a preset, with individual entries overridden.

    Args:
        preset: one of ``WEIGHT_PRESETS`` (``paper``, ``released_mt``, ``released_3d``, ``uniform``).
        w_unlabeled: entries (keys among ``UC, US, DC, DS``) replacing the preset's unlabeled weights;
            the others keep the preset's value.
        w_labeled: same for the labeled weights.

    Returns:
        ``(unlabeled, labeled)``, two fresh ``{"UC", "US", "DC", "DS"} -> float`` dicts.

    Raises:
        ValueError: unknown preset or key (the message lists the valid ones), or a negative weight.
    """
    if preset not in WEIGHT_PRESETS:
        raise ValueError(f"unknown MetaSSL weights preset {preset!r}; valid presets are {list(WEIGHT_PRESETS)}")
    chosen = WEIGHT_PRESETS[preset]
    return (
        _override(chosen["unlabeled"], w_unlabeled, "unlabeled"),
        _override(chosen["labeled"], w_labeled, "labeled"),
    )


def metassl_lambda(t: float, total: float, lambda_max: float = 0.1, rampup_fraction: float = 0.6) -> float:
    """Weight ``lambda(t) = lambda_max * exp(-5 (1 - min(t / (f T), 1))^2)`` of ``L_l + L_u`` (section 6).

    Args:
        t: 0-based global training iteration.
        total: total number of iterations ``T`` (epochs x iterations per epoch).
        lambda_max: plateau value.
        rampup_fraction: ``f``; ``0`` gives a constant ``lambda_max``.
    """
    return float(lambda_max * sigmoid_rampup(t, total, rampup_fraction))


def region_names(split_uc: bool = True) -> tuple[str, ...]:
    """Names of the regions ``quadripartition`` returns: ``UCfg, UCbg, US, DC, DS`` or ``UC, US, DC, DS``."""
    return REGIONS_SPLIT if split_uc else REGIONS_NO_SPLIT


def region_weights(weights: Mapping[str, float], uc_mode: str = "split") -> dict[str, float]:
    """Per-region weights of a ``{"UC", "US", "DC", "DS"}`` weight set under ``uc_mode`` (section 13).

    ``split``: ``UCfg = UCbg = w_UC``. ``released_2d``: ``UCfg = 0`` and ``UCbg = 2 w_UC``, because the
    released 2D scripts add a "confident foreground" term whose mask is the background mask (``== 0``) to the
    background term, so confidently agreed background is counted twice and confidently agreed foreground never.
    ``joint``: one ``UC`` region with ``w_UC``. An explicit ``UCfg`` / ``UCbg`` entry in ``weights`` wins.

    Returns:
        ``region name -> float`` for the names of ``region_names(uc_mode != "joint")``.
    """
    if uc_mode not in UC_MODES:
        raise ValueError(f"unknown uc_mode {uc_mode!r}; valid values are {list(UC_MODES)}")
    out = {r: float(weights[r]) for r in ("US", "DC", "DS")}
    w_uc = float(weights["UC"])
    if uc_mode == "joint":
        out["UC"] = w_uc
    else:
        fg, bg = (0.0, 2.0 * w_uc) if uc_mode == "released_2d" else (w_uc, w_uc)
        out["UCfg"] = float(weights.get("UCfg", fg))
        out["UCbg"] = float(weights.get("UCbg", bg))
    return out


# Keyword arguments of ``MetaSSLLoss`` that reproduce each released script's effective loss (section 13): the
# weights of its generating formula, its UC masks and its region-mean normalisation; labeled regions as every
# released script ("released", section 5).
LOSS_PRESETS: dict[str, dict[str, str]] = {
    "released_mt_2d": {"weights_preset": "released_mt", "uc_mode": "released_2d", "normalization": "region_mean",
                       "labeled_regions": "released"},
    "released_cps_2d": {"weights_preset": "paper", "uc_mode": "released_2d", "normalization": "region_mean",
                        "labeled_regions": "released"},
    "released_3d": {"weights_preset": "released_3d", "uc_mode": "split", "normalization": "region_mean",
                    "labeled_regions": "released"},
}


def loss_preset(name: str) -> dict[str, str]:
    """A fresh copy of ``LOSS_PRESETS[name]`` (``MetaSSLLoss`` keyword arguments).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name not in LOSS_PRESETS:
        raise ValueError(f"unknown MetaSSL loss preset {name!r}; valid presets are {list(LOSS_PRESETS)}")
    return dict(LOSS_PRESETS[name])


def _weight_of(region: str, weights: Mapping[str, float]) -> float:
    # UCfg and UCbg share w_UC; an explicit per-half entry still wins so sweeps can separate them.
    if region in weights:
        return float(weights[region])
    if region in ("UCfg", "UCbg") and "UC" in weights:
        return float(weights["UC"])
    raise ValueError(f"no weight for region {region!r}; weights have keys {list(weights)}")


# ----------------------------------------------------------------------------------------------
# Float32 prediction statistics
# ----------------------------------------------------------------------------------------------
def softmax_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax, argmax and top-1 probability of ``logits`` in float32 with autocast disabled.

    Gradient tracking is left to the caller (wrap in ``torch.no_grad()`` for masks and pseudo-labels).

    Args:
        logits: ``(B, C, *spatial)``, any floating dtype; the class axis is dim 1.

    Returns:
        ``probs`` ``(B, C, *spatial)`` float32, ``argmax`` ``(B, *spatial)`` int64 (ties go to the
        lowest class index, as ``torch.argmax``) and ``maxprob`` ``(B, *spatial)`` float32, the
        probability at ``argmax``.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.float(), dim=1)
        conf, pred = class_max(probs)
    return probs, pred, conf


# ----------------------------------------------------------------------------------------------
# Adaptive per-class thresholds (section 2.2)
# ----------------------------------------------------------------------------------------------
class ClassThresholds(torch.nn.Module):
    """One per-class adaptive threshold set ``tau`` (one per branch and batch part, section 2.2).

    ``tau_c`` tracks the running mean top-1 confidence of the voxels predicted as ``c``:
    ``m_c = s_c / (n_c + 1)`` with ``n_c`` the number of valid voxels whose argmax is ``c`` and ``s_c``
    the sum of their max probabilities (pooled over the whole batch and, under DDP, over all ranks),
    then ``tau_c <- momentum * tau_c + (1 - momentum) * m_c``. The ``+1`` is the released formula.

    Buffers (saved in ``state_dict``):
        ``tau``: ``(C,)`` float32, the stored, never clamped thresholds.
        ``absent_updates``: ``(C,)`` int64, how many updates saw no voxel of class ``c``
        (skipped when ``skip_absent``, otherwise they halved ``tau_c`` with the default momentum).
        ``num_updates``: ``()`` int64.

    Args:
        num_classes: ``C``, including background.
        init: initial value of every ``tau_c``.
        momentum: weight ``beta`` of the old value in the EMA.
        skip_absent: leave ``tau_c`` unchanged when ``n_c = 0`` (project decision; ``False`` reproduces
            the released code, where an absent class has ``m_c = 0``).
        tau_max: clamp applied by ``effective()`` only; ``None`` disables it.
    """

    def __init__(
        self,
        num_classes: int,
        init: float = 0.9,
        momentum: float = 0.5,
        skip_absent: bool = True,
        tau_max: float | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_classes = int(num_classes)
        self.momentum = float(momentum)
        self.skip_absent = bool(skip_absent)
        self.tau_max = None if tau_max is None else float(tau_max)
        self.register_buffer("tau", torch.full((self.num_classes,), float(init), dtype=torch.float32))
        self.register_buffer("absent_updates", torch.zeros(self.num_classes, dtype=torch.int64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    def effective(self) -> torch.Tensor:
        """``min(tau, tau_max)``, ``(C,)`` float32, the values the masks compare against."""
        if self.tau_max is None:
            return self.tau.clone()
        return self.tau.clamp(max=self.tau_max)

    def class_statistics(
        self, pred: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Local ``(s_c, n_c)`` of one prediction, before any all-reduce.

        Args:
            pred: ``(B, *spatial)`` integer class map (argmax).
            conf: ``(B, *spatial)`` top-1 probability at ``pred``.
            valid: optional ``(B, *spatial)`` bool; ``False`` voxels are left out.

        Returns:
            ``s`` and ``n``, each ``(C,)`` float64 on ``conf``'s device.
        """
        if pred.shape != conf.shape or (valid is not None and valid.shape != pred.shape):
            raise ValueError(
                f"pred {tuple(pred.shape)}, conf {tuple(conf.shape)} and valid "
                f"{None if valid is None else tuple(valid.shape)} must have the same shape (B, *spatial)"
            )
        c = self.num_classes
        with torch.no_grad():
            idx = pred.reshape(-1).long().to(conf.device)
            if valid is not None:
                # invalid voxels go to an extra bucket instead of boolean indexing, which would sync
                idx = torch.where(valid.reshape(-1).to(conf.device), idx, torch.full_like(idx, c))
            # float64: an epoch-size pool of voxels would lose digits in a float32 sum
            values = conf.reshape(-1).to(torch.float64)
            s = torch.zeros(c + 1, dtype=torch.float64, device=conf.device).scatter_add_(0, idx, values)
            n = torch.zeros(c + 1, dtype=torch.float64, device=conf.device).scatter_add_(
                0, idx, torch.ones_like(values)
            )
        return s[:c], n[:c]

    @torch.no_grad()
    def update(self, pred: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """One EMA step from a prediction; ``(s_c, n_c)`` are summed over DDP ranks first.

        Every rank must call ``update`` on the same sets in the same order (it is a collective).

        Args:
            pred: ``(B, *spatial)`` integer argmax of the branch's own prediction.
            conf: ``(B, *spatial)`` its top-1 probability (use ``softmax_stats``).
            valid: optional ``(B, *spatial)`` bool mask of the voxels that count (e.g. non-ignore).
        """
        s, n = self.class_statistics(pred, conf, valid)
        # reduced on the data's device (CUDA under NCCL), then brought to wherever tau lives
        both = all_reduce_sum(torch.stack([s, n])).to(self.tau.device)
        s, n = both[0], both[1]
        tau = self.tau.to(torch.float64)
        new = self.momentum * tau + (1.0 - self.momentum) * s / (n + 1.0)
        absent = n == 0
        if self.skip_absent:
            new = torch.where(absent, tau, new)
        self.tau.copy_(new.to(torch.float32))
        self.absent_updates += absent.to(torch.int64)
        self.num_updates += 1

    @torch.no_grad()
    def update_from_logits(self, logits: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """``update`` from ``(B, C, *spatial)`` logits (float32 softmax, autocast off)."""
        _, pred, conf = softmax_stats(logits)
        self.update(pred, conf, valid)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, momentum={self.momentum}, "
            f"skip_absent={self.skip_absent}, tau_max={self.tau_max}"
        )


# ----------------------------------------------------------------------------------------------
# Quadripartition and region-weighted CE (sections 2.3, 2.4, 3)
# ----------------------------------------------------------------------------------------------
def quadripartition(
    pred_a: torch.Tensor,
    pred_b: torch.Tensor,
    conf: torch.Tensor,
    conf_pred: torch.Tensor,
    tau: torch.Tensor,
    valid: torch.Tensor | None = None,
    split_uc: bool = True,
) -> dict[str, torch.Tensor]:
    """Split the valid voxels into unanimous/discrepant x confident/suspicious regions.

    A voxel is unanimous when ``pred_a == pred_b`` and confident when ``conf > tau[conf_pred]``
    (strict, float32, threshold gathered at the voxel's own predicted class). Uses per variant:
    unlabeled ``(y^, y~, q~, y~)``; labeled ``released`` ``(y^, y~, q, y^)``; labeled ``figure``
    ``(y*, y~, q~, y~)``.

    Args:
        pred_a, pred_b: ``(B, *spatial)`` integer class maps whose agreement defines "unanimous".
        conf: ``(B, *spatial)`` confidence of the prediction that supplies the threshold.
        conf_pred: ``(B, *spatial)`` class map of that prediction; it indexes ``tau`` and splits UC
            into foreground (``!= 0``) and background (``== 0``).
        tau: ``(C,)`` effective thresholds (``ClassThresholds.effective()``).
        valid: optional ``(B, *spatial)`` bool; invalid voxels belong to no region.
        split_uc: split UC into ``UCfg``/``UCbg`` (default) or keep one ``UC`` region.

    Returns:
        Disjoint ``(B, *spatial)`` bool masks covering the valid voxels, keyed
        ``UCfg, UCbg, US, DC, DS`` (or ``UC, US, DC, DS``), in ``region_names(split_uc)`` order.
    """
    shape = pred_a.shape
    for name, t in (("pred_b", pred_b), ("conf", conf), ("conf_pred", conf_pred), ("valid", valid)):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like pred_a")
    if tau.ndim != 1:
        raise ValueError(f"tau must be (C,), got shape {tuple(tau.shape)}")
    with torch.no_grad(), torch.autocast(device_type=conf.device.type, enabled=False):
        thr = tau.to(device=conf.device, dtype=torch.float32)[conf_pred.long()]
        confident = conf.float() > thr
        agree = pred_a == pred_b
        if valid is not None:
            agree_v, disagree_v = agree & valid, ~agree & valid
        else:
            agree_v, disagree_v = agree, ~agree
        uc = agree_v & confident
        regions: dict[str, torch.Tensor] = {}
        if split_uc:
            fg = conf_pred != 0
            regions["UCfg"] = uc & fg
            regions["UCbg"] = uc & ~fg
        else:
            regions["UC"] = uc
        regions["US"] = agree_v & ~confident
        regions["DC"] = disagree_v & confident
        regions["DS"] = disagree_v & ~confident
    return regions


def region_weighted_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    regions: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    normalization: str = "region_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over regions of ``w_R * sum_{i in R} CE_i / (|R| + 1)`` (section 3), or of ``/ (|V| + 1)``.

    CE is computed once per voxel in float32 (autocast off), without class weights or smoothing. With
    ``region_mean`` it is a sum of region means, so a small region weighs as much as a large one; an empty
    region adds 0. With ``voxel_mean`` every region shares the denominator ``|V| + 1`` (``V`` = the union of
    the regions), so a voxel weighs ``w_R / (|V| + 1)`` whatever the size of its region; the ``+ 1`` makes a
    batch that is one region give exactly the ``region_mean`` value (section 13).
    Voxels outside every region (ignore, invalid) have their target replaced by 0 before the gather and
    are then masked out, so an ignore value is never used as an index.

    Args:
        logits: ``(B, C, *spatial)``, any floating dtype; the only tensor that receives gradient.
        target: ``(B, *spatial)`` integer hard labels (pseudo-label or ground truth); detached.
        regions: name -> ``(B, *spatial)`` bool mask, disjoint (from ``quadripartition``).
        weights: ``{"UC", "US", "DC", "DS"} -> float``; ``UCfg``/``UCbg`` use ``"UC"`` unless keyed
            themselves (``region_weights`` gives every region its own key).
        normalization: ``"region_mean"`` or ``"voxel_mean"``.

    Returns:
        ``loss``: float32 scalar. ``stats``: detached 0-dim tensors per region ``R``:
        ``n_R`` (int64 voxel count), ``ce_R`` (float32 sum of unweighted CE over ``R``),
        ``wterm_R`` (float32 ``w_R * l_R``) and ``nfg_R`` (int64 count of the voxels of ``R`` whose
        target is foreground, ``!= 0``); and ``wvox_fg`` / ``wvox_bg`` (float32 sums of the per-voxel
        weights ``w_R / (|R| + 1)``, or ``w_R / (|V| + 1)``, over foreground- / background-target voxels), for
        ``RegionCounter``.
        Region means give a voxel of a small region a large weight; when small regions are mostly
        foreground this acts as an implicit class weight, which ``wvox_*`` measure.
    """
    if logits.ndim < 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"logits must be (B, C, *spatial) and target (B, *spatial); got {tuple(logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; valid values are {list(NORMALIZATIONS)}")
    target = target.detach().long()
    covered = None
    for mask in regions.values():
        covered = mask if covered is None else covered | mask
    if covered is not None:
        target = torch.where(covered, target, torch.zeros_like(target))
    n_valid = covered.sum() if covered is not None else target.new_zeros(())
    with torch.autocast(device_type=logits.device.type, enabled=False):
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        loss = logits.new_zeros((), dtype=torch.float32)
        stats: dict[str, torch.Tensor] = {}
        foreground = target != 0
        wvox_fg = wvox_bg = logits.new_zeros((), dtype=torch.float32)
        for name, mask in regions.items():
            w = _weight_of(name, weights)
            ce_sum = torch.where(mask, ce, torch.zeros_like(ce)).sum()
            count = mask.sum()
            n_fg = (mask & foreground).sum()
            denominator = count if normalization == "region_mean" else n_valid
            per_voxel = w / (denominator + 1).to(torch.float32)
            term = per_voxel * ce_sum
            loss = loss + term
            stats[f"n_{name}"] = count.detach()
            stats[f"ce_{name}"] = ce_sum.detach()
            stats[f"wterm_{name}"] = term.detach()
            stats[f"nfg_{name}"] = n_fg
            wvox_fg = wvox_fg + per_voxel * n_fg
            wvox_bg = wvox_bg + per_voxel * (count - n_fg)
        stats["wvox_fg"] = wvox_fg.detach()
        stats["wvox_bg"] = wvox_bg.detach()
    return loss, stats


def _prepare_target(
    target: torch.Tensor, logits: torch.Tensor, ignore_label: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B, *S)`` or ``(B, 1, *S)`` labels -> ``(B, *S)`` int64 with ignore set to 0, and the valid mask."""
    expected = logits.shape[:1] + logits.shape[2:]
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != expected:
        raise ValueError(
            f"target must be (B, *spatial) = {tuple(expected)} or (B, 1, *spatial), got {tuple(target.shape)}"
        )
    target = target.detach().to(device=logits.device).long()
    if ignore_label is None:
        return target, None
    valid = target != int(ignore_label)
    return torch.where(valid, target, torch.zeros_like(target)), valid


# ----------------------------------------------------------------------------------------------
# The loss object the trainers own (sections 2-5, 7, 9)
# ----------------------------------------------------------------------------------------------
class MetaSSLLoss(torch.nn.Module):
    """MetaSSL's heterogeneous CE for unlabeled and labeled batches, owning the tau sets.

    The reference side, every mask and every tau update run under ``no_grad``; gradient reaches
    ``sup_logits`` only. Pass full-resolution outputs only (``output[0]`` under deep supervision,
    section 10). Each tau set must be updated at most once per training iteration and never during
    validation (``update=False``).

    Tau sets are named freely (no ``.``): Mean Teacher / FixMatch use ``"ref_u"`` and ``"sup_l"``
    (``released``) or ``"ref_l"`` (``figure``); CPS uses ``"1_u", "2_u", "1_l", "2_l"``. Sets named in
    ``tau_sets`` are created at construction; others are created on first use and, when loading a
    ``state_dict``, from its keys, so checkpoints always restore every set. Sets follow the device of
    the logits they are used with.

    Args:
        num_classes: ``C`` (segmentation heads, background included).
        weights_preset: ``paper`` (default), ``released_mt``, ``released_3d`` or ``uniform``.
        w_unlabeled, w_labeled: per-key overrides of the preset (keys ``UC, US, DC, DS``).
        split_uc: legacy switch: ``True`` = ``uc_mode="split"``, ``False`` = ``"joint"``; leave ``None``
            when ``uc_mode`` is given.
        tau_init, tau_momentum, tau_max, tau_skip_absent: ``ClassThresholds`` settings of every set.
        labeled_regions: ``"released"`` (agreement of p and p~, supervised confidence vs its own
            labeled set) or ``"figure"`` (agreement of p~ and y*, reference confidence), section 5.
        tau_sets: names created eagerly; default ``("ref_u", "sup_l")`` for ``released`` and
            ``("ref_u", "ref_l")`` for ``figure``.
        uc_mode: ``"split"`` (default), ``"released_2d"`` or ``"joint"`` (``UC_MODES``, section 13); the
            same mode applies to the unlabeled and the labeled term, as in the released scripts.
        normalization: ``"region_mean"`` (default, section 3) or ``"voxel_mean"`` (section 13).

    ``MetaSSLLoss.from_preset(name, num_classes, **overrides)`` builds the loss of a released script
    (``LOSS_PRESETS``).
    """

    def __init__(
        self,
        num_classes: int,
        weights_preset: str = "paper",
        w_unlabeled: Mapping[str, float] | None = None,
        w_labeled: Mapping[str, float] | None = None,
        split_uc: bool | None = None,
        tau_init: float = 0.9,
        tau_momentum: float = 0.5,
        tau_max: float | None = None,
        tau_skip_absent: bool = True,
        labeled_regions: str = "released",
        tau_sets: Iterable[str] | None = None,
        uc_mode: str | None = None,
        normalization: str = "region_mean",
    ) -> None:
        super().__init__()
        if uc_mode is None:
            uc_mode = "split" if split_uc is None or split_uc else "joint"
        elif split_uc is not None and bool(split_uc) != (uc_mode != "joint"):
            raise ValueError(f"split_uc={split_uc} contradicts uc_mode={uc_mode!r}; pass only uc_mode")
        if uc_mode not in UC_MODES:
            raise ValueError(f"unknown uc_mode {uc_mode!r}; valid values are {list(UC_MODES)}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; valid values are {list(NORMALIZATIONS)}")
        if labeled_regions not in LABELED_REGION_VARIANTS:
            raise ValueError(
                f"unknown labeled_regions {labeled_regions!r}; valid values are {list(LABELED_REGION_VARIANTS)}"
            )
        self.num_classes = int(num_classes)
        self.weights_unlabeled, self.weights_labeled = resolve_weights(weights_preset, w_unlabeled, w_labeled)
        self.weights_preset = weights_preset
        self.uc_mode = uc_mode
        self.normalization = normalization
        self.split_uc = uc_mode != "joint"
        # what region_weighted_ce applies, region by region (released_2d: UCfg 0, UCbg 2 w_UC)
        self.region_weights_unlabeled = region_weights(self.weights_unlabeled, uc_mode)
        self.region_weights_labeled = region_weights(self.weights_labeled, uc_mode)
        self.labeled_regions = labeled_regions
        self._tau_kwargs = dict(init=tau_init, momentum=tau_momentum, skip_absent=tau_skip_absent, tau_max=tau_max)
        self.sets = torch.nn.ModuleDict()
        if tau_sets is None:
            tau_sets = ("ref_u", "sup_l" if labeled_regions == "released" else "ref_l")
        for name in tau_sets:
            self._create_set(name)

    @classmethod
    def from_preset(cls, name: str, num_classes: int, **overrides) -> "MetaSSLLoss":
        """The loss of a released script (``LOSS_PRESETS[name]``), with any keyword argument overridden."""
        return cls(num_classes, **{**loss_preset(name), **overrides})

    @property
    def regions(self) -> tuple[str, ...]:
        """Region names produced by this loss (``region_names(self.split_uc)``)."""
        return region_names(self.split_uc)

    def _create_set(self, name: str) -> ClassThresholds:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"tau set names must be non-empty strings without '.', got {name!r}")
        if name not in self.sets:
            self.sets[name] = ClassThresholds(self.num_classes, **self._tau_kwargs)
        return self.sets[name]

    def threshold_set(self, name: str, device: torch.device | None = None) -> ClassThresholds:
        """The ``ClassThresholds`` called ``name``, created if missing and moved to ``device`` if given."""
        thresholds = self.sets[name] if name in self.sets else self._create_set(name)
        if device is not None and thresholds.tau.device != torch.device(device):
            thresholds.to(device)
        return thresholds

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Sets created lazily in the saved run do not exist yet in a fresh object: create them from
        # the checkpoint's keys before torch recurses into ``self.sets``.
        head = prefix + "sets."
        for key in state_dict:
            if key.startswith(head) and key.endswith(".tau"):
                name = key[len(head) : -len(".tau")]
                if name and "." not in name and name not in self.sets:
                    self._create_set(name)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_pair(self, sup_logits: torch.Tensor, ref_logits: torch.Tensor) -> None:
        if sup_logits.shape != ref_logits.shape:
            raise ValueError(
                f"supervised and reference logits must have the same shape, got {tuple(sup_logits.shape)} "
                f"and {tuple(ref_logits.shape)}"
            )
        if sup_logits.ndim < 3 or sup_logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must be (B, {self.num_classes}, *spatial), got {tuple(sup_logits.shape)}"
            )

    def unlabeled_loss(
        self,
        sup_logits: torch.Tensor,
        ref_logits: torch.Tensor,
        tau_set: str = "ref_u",
        update: bool = True,
        valid: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_u``: region-weighted CE of ``sup_logits`` toward ``argmax`` of the reference (section 3).

        Regions: agreement of ``y^`` and ``y~``; confidence ``q~`` vs ``tau_set`` at ``y~``; UC split
        by ``y~``. With ``update``, ``tau_set`` is first updated from the reference prediction (so the
        masks of this iteration use the new thresholds, section 2.2).

        With an explicit ``target`` ``t`` (a pseudo-label derived from the reference, e.g. BCP's
        largest-component filter of ``y~``), ``t`` replaces ``y~`` as the CE target *and* in the regions:
        agreement of ``y^`` and ``t``, the reference's probability of ``t``, ``p~[t]``, vs ``tau_set`` at
        ``t``, UC split by ``t``. Where ``t == y~`` this is exactly the default; a voxel whose target
        contradicts the reference gets ``p~[t] < q~`` and is normally suspicious, so an overridden
        pseudo-label is down-weighted rather than trusted as unanimous-confident. ``tau_set`` is still
        updated from the reference's own ``(y~, q~)``.

        Args:
            sup_logits: ``(B, C, *spatial)`` supervised logits (student, strong view, net k).
            ref_logits: ``(B, C, *spatial)`` reference logits (teacher, weak view, other net); never
                receives gradient. Warped probabilities can be passed as ``probs.clamp_min(1e-12).log()``.
            tau_set: name of the reference's unlabeled tau set.
            update: update ``tau_set`` from this batch first.
            valid: optional ``(B, *spatial)`` bool, e.g. voxels inside a warped field; others are
                left out of the regions and of the tau statistics.
            target: optional ``(B, *spatial)`` or ``(B, 1, *spatial)`` hard labels in ``[0, C)`` on the
                valid voxels (others are never read, so an ignore value may stay there); ``None``:
                ``argmax`` of the reference.

        Returns:
            ``(loss, stats)``: float32 scalar and the ``region_weighted_ce`` stats
            (``n_R``, ``ce_R``, ``wterm_R``).
        """
        self._check_pair(sup_logits, ref_logits)
        thresholds = self.threshold_set(tau_set, sup_logits.device)
        with torch.no_grad():
            ref_probs, ref_pred, ref_conf = softmax_stats(ref_logits.detach())
            _, sup_pred, _ = softmax_stats(sup_logits.detach())
            if update:
                thresholds.update(ref_pred, ref_conf, valid)
            tgt, tgt_conf = ref_pred, ref_conf
            if target is not None:
                tgt, _ = _prepare_target(target, sup_logits, None)
                if valid is not None:  # invalid voxels may hold an ignore value that must not index p~
                    tgt = torch.where(valid.to(tgt.device), tgt, ref_pred)
                tgt_conf = ref_probs.gather(1, tgt.unsqueeze(1)).squeeze(1)
            regions = quadripartition(sup_pred, tgt, tgt_conf, tgt, thresholds.effective(), valid, self.split_uc)
        return region_weighted_ce(sup_logits, tgt, regions, self.region_weights_unlabeled, self.normalization)

    def labeled_loss(
        self,
        sup_logits: torch.Tensor,
        ref_logits: torch.Tensor,
        target: torch.Tensor,
        ignore_label: int | None = None,
        sup_set: str = "sup_l",
        ref_set: str = "ref_l",
        update: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_l``: region-weighted CE of ``sup_logits`` toward the ground truth ``y*`` (section 5).

        ``released``: agreement of ``y^`` and ``y~``; supervised ``q`` vs ``sup_set`` at ``y^``, which
        is updated from the supervised prediction; UC split by ``y^``. ``figure``: agreement of ``y~``
        and ``y*``; reference ``q~`` vs ``ref_set`` at ``y~``, updated from the reference; UC split by
        ``y~`` (equal to ``y*`` inside UC). Ignore voxels are left out of the regions, the counts and
        the tau statistics.

        Args:
            sup_logits: ``(B, C, *spatial)`` supervised logits, the only gradient path.
            ref_logits: ``(B, C, *spatial)`` reference logits on the same labeled batch.
            target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` labels (any integer or integral float dtype).
            ignore_label: label value to leave out, or ``None``.
            sup_set: tau set used by ``released`` (supervised branch, labeled part).
            ref_set: tau set used by ``figure`` (reference branch, labeled part).
            update: update the variant's tau set from this batch first.

        Returns:
            ``(loss, stats)`` as ``unlabeled_loss``; an all-ignore batch gives ``loss = 0`` with zero gradient.
        """
        self._check_pair(sup_logits, ref_logits)
        target, valid = _prepare_target(target, sup_logits, ignore_label)
        with torch.no_grad():
            _, ref_pred, ref_conf = softmax_stats(ref_logits.detach())
            _, sup_pred, sup_conf = softmax_stats(sup_logits.detach())
            if self.labeled_regions == "released":
                thresholds = self.threshold_set(sup_set, sup_logits.device)
                if update:
                    thresholds.update(sup_pred, sup_conf, valid)
                regions = quadripartition(
                    sup_pred, ref_pred, sup_conf, sup_pred, thresholds.effective(), valid, self.split_uc
                )
            else:
                thresholds = self.threshold_set(ref_set, sup_logits.device)
                if update:
                    thresholds.update(ref_pred, ref_conf, valid)
                regions = quadripartition(
                    target, ref_pred, ref_conf, ref_pred, thresholds.effective(), valid, self.split_uc
                )
        return region_weighted_ce(sup_logits, target, regions, self.region_weights_labeled, self.normalization)

    @torch.no_grad()
    def shadow_diagnostics(
        self,
        sup_logits: torch.Tensor,
        ref_logits: torch.Tensor,
        target: torch.Tensor,
        ignore_label: int | None = None,
        tau_set: str = "ref_u",
    ) -> dict[str, torch.Tensor]:
        """Pseudo-label reliability per region: the unlabeled rule applied to a labeled batch (section 9).

        Regions as in ``unlabeled_loss`` (agreement of ``y^`` and ``y~``, ``q~`` vs ``tau_set`` at
        ``y~``) without updating ``tau_set``; ignore voxels are left out.

        Args:
            sup_logits, ref_logits: ``(B, C, *spatial)`` logits on the labeled batch.
            target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` labels.
            ignore_label: label value to leave out, or ``None``.
            tau_set: the reference's unlabeled tau set.

        Returns:
            Detached int64 0-dim tensors ``n_R`` (voxels in ``R``) and ``correct_R``
            (voxels in ``R`` with ``y~ == y*``), for ``RegionCounter("shadow", ...)``.
        """
        self._check_pair(sup_logits, ref_logits)
        target, valid = _prepare_target(target, sup_logits, ignore_label)
        thresholds = self.threshold_set(tau_set, sup_logits.device)
        _, ref_pred, ref_conf = softmax_stats(ref_logits)
        _, sup_pred, _ = softmax_stats(sup_logits)
        regions = quadripartition(
            sup_pred, ref_pred, ref_conf, ref_pred, thresholds.effective(), valid, self.split_uc
        )
        correct = ref_pred == target
        stats: dict[str, torch.Tensor] = {}
        for name, mask in regions.items():
            stats[f"n_{name}"] = mask.sum()
            stats[f"correct_{name}"] = (mask & correct).sum()
        return stats

    def threshold_diagnostics(self) -> dict[str, float]:
        """Epoch-end values of every tau set, for logging (section 9).

        Returns:
            ``tau_{set}_{c}`` (stored value), ``tau_eff_{set}_{c}`` (only when ``tau_max`` is set) and
            ``tau_absent_{set}_{c}`` (cumulative count of updates in which class ``c`` was absent,
            i.e. skipped when ``tau_skip_absent``), for every set and class.
        """
        out: dict[str, float] = {}
        for name, thresholds in self.sets.items():
            tau = thresholds.tau.detach().cpu().tolist()
            eff = thresholds.effective().detach().cpu().tolist()
            absent = thresholds.absent_updates.detach().cpu().tolist()
            for c in range(self.num_classes):
                out[f"tau_{name}_{c}"] = float(tau[c])
                if thresholds.tau_max is not None:
                    out[f"tau_eff_{name}_{c}"] = float(eff[c])
                out[f"tau_absent_{name}_{c}"] = float(absent[c])
        return out

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, weights_preset={self.weights_preset!r}, uc_mode={self.uc_mode!r}, "
            f"normalization={self.normalization!r}, "
            f"labeled_regions={self.labeled_regions!r}, w_unlabeled={self.weights_unlabeled}, "
            f"w_labeled={self.weights_labeled}"
        )


# ----------------------------------------------------------------------------------------------
# Epoch accumulation of diagnostics (section 9)
# ----------------------------------------------------------------------------------------------
class RegionCounter:
    """Sums the per-batch stats of one kind over an epoch, then divides once (section 9).

    Ratios of per-batch ratios would weight a small batch like a large one; summing counts and sums
    first gives the epoch-level fraction, mean CE and accuracy.

    Kinds and the keys ``summary()`` returns, for each region ``R`` (``suffix`` appended, e.g. ``_1``
    for CPS direction 1):

    - ``"u"`` / ``"l"`` (stats of ``unlabeled_loss`` / ``labeled_loss``): ``{kind}_frac_R`` =
      sum |R| / sum |V|, ``{kind}_ce_R`` = mean unweighted CE over the voxels of ``R``,
      ``{kind}_wterm_R`` = mean over batches of ``w_R * l_R``, ``{kind}_fgfrac_R`` = share of the
      voxels of ``R`` whose target is foreground; and ``{kind}_fg_weight`` = the mean loss weight of a
      foreground-target voxel over that of a background-target one (1 for a plain voxel-mean CE;
      above 1, the region means favour foreground like a class weight would).
    - ``"shadow"`` (stats of ``shadow_diagnostics``): ``shadow_acc_R`` = correct / |R| and
      ``shadow_frac_R`` = |R| / |V|.

    Empty denominators give NaN. ``|V|`` is the sum over regions, since the regions cover the valid voxels.

    Args:
        kind: ``"u"``, ``"l"`` or ``"shadow"``.
        regions: region names (``MetaSSLLoss.regions``).
        suffix: appended to every key.
    """

    KINDS = ("u", "l", "shadow")

    def __init__(self, kind: str, regions: Sequence[str], suffix: str = "") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown RegionCounter kind {kind!r}; valid kinds are {list(self.KINDS)}")
        self.kind = kind
        self.regions = tuple(regions)
        self.suffix = suffix
        fields = ("n", "correct") if kind == "shadow" else ("n", "ce", "wterm", "nfg")
        totals = [] if kind == "shadow" else ["wvox_fg", "wvox_bg"]
        self._fields = [f"{f}_{r}" for r in self.regions for f in fields] + totals + ["batches"]
        self.reset()

    def reset(self) -> None:
        """Zero every sum (start of an epoch)."""
        self._sums: dict[str, torch.Tensor] = {k: torch.zeros((), dtype=torch.float64) for k in self._fields}

    def add(self, stats: Mapping[str, torch.Tensor | float]) -> None:
        """Add one batch's stats (0-dim tensors on any device, or floats); counts one batch.

        Raises:
            KeyError: a field this kind needs is missing from ``stats``.
        """
        for key in self._fields:
            if key == "batches":
                value: torch.Tensor | float = 1.0
            else:
                if key not in stats:
                    raise KeyError(f"stats lack {key!r} needed by RegionCounter({self.kind!r}); got {sorted(stats)}")
                value = stats[key]
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float64)
            # a 0-dim CPU start value adds to a device tensor without a host sync
            self._sums[key] = self._sums[key] + value

    def all_reduce(self, device: torch.device | str | None = None) -> None:
        """Sum the counts over DDP ranks in place (no-op outside ``torch.distributed``).

        Args:
            device: where the collective runs (must be CUDA for NCCL); defaults to the device of the
                accumulated tensors.
        """
        if device is None:
            device = next((v.device for v in self._sums.values() if v.device.type != "cpu"), torch.device("cpu"))
        packed = torch.stack([self._sums[k].to(device=device, dtype=torch.float64) for k in self._fields])
        packed = all_reduce_sum(packed)
        self._sums = {k: packed[i] for i, k in enumerate(self._fields)}

    def counts(self) -> dict[str, float]:
        """The raw accumulated sums (``n_R``, ``ce_R``/``correct_R``, ``wterm_R``, ``batches``)."""
        return {k: float(v) for k, v in self._sums.items()}

    def keys(self) -> list[str]:
        """The keys ``summary()`` returns, e.g. to pre-register them with nnU-Net's logger."""
        names = ("acc", "frac") if self.kind == "shadow" else ("frac", "ce", "wterm", "fgfrac")
        keys = [f"{self.kind}_{n}_{r}{self.suffix}" for r in self.regions for n in names]
        return keys if self.kind == "shadow" else keys + [f"{self.kind}_fg_weight{self.suffix}"]

    def summary(self) -> dict[str, float]:
        """Epoch-level ratios (see the class docstring); NaN where the denominator is 0."""
        sums = self.counts()

        def ratio(num: float, den: float) -> float:
            return num / den if den > 0 else float("nan")

        total = sum(sums[f"n_{r}"] for r in self.regions)
        out: dict[str, float] = {}
        for r in self.regions:
            n = sums[f"n_{r}"]
            if self.kind == "shadow":
                out[f"shadow_acc_{r}{self.suffix}"] = ratio(sums[f"correct_{r}"], n)
                out[f"shadow_frac_{r}{self.suffix}"] = ratio(n, total)
            else:
                out[f"{self.kind}_frac_{r}{self.suffix}"] = ratio(n, total)
                out[f"{self.kind}_ce_{r}{self.suffix}"] = ratio(sums[f"ce_{r}"], n)
                out[f"{self.kind}_wterm_{r}{self.suffix}"] = ratio(sums[f"wterm_{r}"], sums["batches"])
                out[f"{self.kind}_fgfrac_{r}{self.suffix}"] = ratio(sums[f"nfg_{r}"], n)
        if self.kind != "shadow":
            n_fg = sum(sums[f"nfg_{r}"] for r in self.regions)
            # NaN when either class is absent (ratio's denominator test is False for NaN)
            mean_fg = ratio(sums["wvox_fg"], n_fg)
            mean_bg = ratio(sums["wvox_bg"], total - n_fg)
            out[f"{self.kind}_fg_weight{self.suffix}"] = ratio(mean_fg, mean_bg)
        return out
