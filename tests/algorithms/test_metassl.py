"""Tests of nnunet_ssl.algorithms.metassl on the hand-computed example of specs/metassl.md section 11.

Base example: 2D, shape (1, 2, 2, 3), voxels a-f row-major, logits = ln(probabilities).
"""
from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest
import torch

from nnunet_ssl.algorithms.metassl import (
    WEIGHT_PRESETS,
    ClassThresholds,
    MetaSSLLoss,
    RegionCounter,
    exp_weights,
    metassl_lambda,
    power_weights,
    quadripartition,
    region_names,
    region_weighted_ce,
    resolve_weights,
    softmax_stats,
)

TOL = 1e-5
REF = [(0.10, 0.90), (0.80, 0.20), (0.25, 0.75), (0.10, 0.90), (0.60, 0.40), (0.10, 0.90)]
SUP = [(0.25, 0.75), (0.90, 0.10), (0.20, 0.80), (0.80, 0.20), (0.25, 0.75), (0.10, 0.90)]
Y_STAR = [[1, 0, 1], [0, 0, 2]]  # 2 = ignore (voxel f)
IGNORE = 2
TAU_REF_U = (0.70, 0.85)
W4321 = {"UC": 4.0, "US": 3.0, "DC": 2.0, "DS": 1.0}
# unlabeled region and CE vs argmax ref of each voxel (spec table)
U_REGION = ["UCfg", "UCbg", "US", "DC", "DS", "UCfg"]
U_CE = [-math.log(0.75), -math.log(0.90), -math.log(0.80), -math.log(0.20), -math.log(0.25), -math.log(0.90)]


def _logits(probs, batch: int = 1, three_d: bool = False) -> torch.Tensor:
    z = torch.tensor(probs, dtype=torch.float64).log().T.reshape(1, 2, 2, 3).float()
    if three_d:
        z = z.reshape(1, 2, 1, 2, 3)
    return z.repeat(batch, *([1] * (z.ndim - 1)))


def _target(batch: int = 1, three_d: bool = False) -> torch.Tensor:
    y = torch.tensor(Y_STAR, dtype=torch.long).reshape(1, 2, 3)
    if three_d:
        y = y.reshape(1, 1, 2, 3)
    return y.repeat(batch, *([1] * (y.ndim - 1)))


def _loss(split_uc: bool = True, labeled_regions: str = "released", **kw) -> MetaSSLLoss:
    m = MetaSSLLoss(
        2,
        weights_preset="uniform",
        w_unlabeled=W4321,
        w_labeled=W4321,
        split_uc=split_uc,
        labeled_regions=labeled_regions,
        **kw,
    )
    m.threshold_set("ref_u").tau.copy_(torch.tensor(TAU_REF_U))
    return m


def _expected_unlabeled(copies: int) -> float:
    """Closed form of the pooled loss for ``copies`` copies of the example on the batch axis."""
    total = 0.0
    for r in region_names(True):
        idx = [i for i, g in enumerate(U_REGION) if g == r]
        w = W4321["UC" if r.startswith("UC") else r]
        total += w * copies * sum(U_CE[i] for i in idx) / (copies * len(idx) + 1)
    return total


def _masks_as_lists(regions):
    return {k: v.reshape(-1).tolist() for k, v in regions.items()}


# ------------------------------------------------------------------------------------------------
# Weights (T14) and ramp (T13)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, unlabeled, labeled",
    [
        ("paper", (50, 40.287, 8.882, 0.1466), (85, 82.736, 68.488, 41.003)),
        ("released_mt", (50, 40, 0.2048, 6.4), (50, 35.714, 18.222, 25.510)),
        ("released_3d", (50, 40, 0.2048, 6.4), (50, 33.333, 14.815, 22.222)),
        ("uniform", (50, 50, 50, 50), (50, 50, 50, 50)),
    ],
)
def test_t14_presets_match_spec(preset, unlabeled, labeled):
    wu, wl = resolve_weights(preset)
    for key, a, b in zip(("UC", "US", "DC", "DS"), unlabeled, labeled):
        assert wu[key] == pytest.approx(a, abs=1e-3)
        assert wl[key] == pytest.approx(b, abs=1e-3)
        assert type(wu[key]) is float and type(wl[key]) is float


def test_generating_formulas():
    assert power_weights(50, 1.25, 5) == pytest.approx({"UC": 50, "US": 40, "DC": 0.2048, "DS": 6.4})
    # labeled released power formula = gamma 1
    assert power_weights(50, 1.4, 1) == pytest.approx({"UC": 50, "US": 50 / 1.4, "DC": 50 / 1.4**3, "DS": 50 / 1.4**2})
    assert exp_weights(50, 0.6, 3) == pytest.approx(WEIGHT_PRESETS["paper"]["unlabeled"])
    assert exp_weights(85, 0.3, 3)["DS"] == pytest.approx(85 * math.exp(-0.729))
    with pytest.raises(ValueError):
        power_weights(50, 0, 5)


def test_t14_override_single_key_changes_only_that_weight():
    base_u, base_l = resolve_weights("released_mt")
    wu, wl = resolve_weights("released_mt", w_unlabeled={"DC": 7.5})
    assert wu["DC"] == 7.5
    assert {k: v for k, v in wu.items() if k != "DC"} == {k: v for k, v in base_u.items() if k != "DC"}
    assert wl == base_l
    _, wl2 = resolve_weights("paper", w_labeled={"US": 1})
    assert wl2["US"] == 1.0 and wl2["UC"] == pytest.approx(85.0)
    # the module-level presets are never mutated through the returned dicts
    wu["UC"] = -1.0
    assert WEIGHT_PRESETS["released_mt"]["unlabeled"]["UC"] == 50.0
    m = MetaSSLLoss(2, weights_preset="released_3d", w_labeled={"DS": 3.0})
    assert m.weights_labeled["DS"] == 3.0 and m.weights_labeled["DC"] == pytest.approx(14.815, abs=1e-3)


def test_bad_preset_key_and_variant_errors():
    with pytest.raises(ValueError, match=r"'nope'.*paper.*released_mt.*released_3d.*uniform"):
        resolve_weights("nope")
    with pytest.raises(ValueError, match=r"'UCfg'.*'UC', 'US', 'DC', 'DS'"):
        resolve_weights("paper", w_unlabeled={"UCfg": 1.0})
    with pytest.raises(ValueError, match=r"'XX'"):
        resolve_weights("paper", w_labeled={"XX": 1.0})
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        resolve_weights("paper", w_labeled={"UC": -1.0})
    with pytest.raises(ValueError, match=r"'bogus'.*released.*figure"):
        MetaSSLLoss(2, labeled_regions="bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        MetaSSLLoss(2, weights_preset="bogus")


def test_t13_ramp():
    expected = {0: 6.7379e-4, 150: 6.0055e-3, 300: 0.0286505, 450: 0.0731616, 600: 0.1, 999: 0.1}
    for t, v in expected.items():
        assert metassl_lambda(t, 1000, 0.1, 0.6) == pytest.approx(v, rel=1e-4)
    released = lambda t: 0.1 * math.exp(-5 * (1 - min(t // 150, 200) / 200) ** 2)  # noqa: E731
    for t in (15000, 30000):
        assert metassl_lambda(t, 50000) == pytest.approx(released(t), abs=1e-7)
    assert metassl_lambda(0, 1000, 0.2, 0.0) == 0.2


# ------------------------------------------------------------------------------------------------
# Regions and loss (T1-T7)
# ------------------------------------------------------------------------------------------------
def test_softmax_stats_float32_and_ties():
    z = torch.zeros(1, 3, 2, dtype=torch.float16)
    z[0, 1, 1] = 1.0
    probs, pred, conf = softmax_stats(z)
    assert probs.dtype == conf.dtype == torch.float32 and pred.dtype == torch.int64
    assert pred.tolist() == [[0, 1]]  # tie -> lowest index
    assert conf[0, 0].item() == pytest.approx(1 / 3)
    assert conf[0, 1].item() == pytest.approx(math.e / (math.e + 2))


def test_t1_regions():
    zr, zs = _logits(REF), _logits(SUP)
    _, ref_pred, ref_conf = softmax_stats(zr)
    _, sup_pred, _ = softmax_stats(zs)
    regions = quadripartition(sup_pred, ref_pred, ref_conf, ref_pred, torch.tensor(TAU_REF_U))
    assert list(regions) == list(region_names(True))
    got = _masks_as_lists(regions)
    for r in region_names(True):
        assert got[r] == [g == r for g in U_REGION], r
    stack = torch.stack(list(regions.values())).long()
    assert stack.sum(0).eq(1).all()  # disjoint and covering
    m = _loss()
    _, stats = m.unlabeled_loss(zs, zr, update=False)
    counter = RegionCounter("u", m.regions)
    counter.add(stats)
    s = counter.summary()
    assert s["u_frac_UCfg"] == pytest.approx(2 / 6)
    for r in ("UCbg", "US", "DC", "DS"):
        assert s[f"u_frac_{r}"] == pytest.approx(1 / 6)


def test_t2_loss_value_and_fg_uc_defect():
    m = _loss()
    loss, stats = m.unlabeled_loss(_logits(SUP), _logits(REF), update=False)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(3.372078, abs=TOL)
    assert abs(loss.item() - 3.058742) > 1e-2  # the released 2D ``== 0`` foreground-UC mask
    terms = {r: stats[f"wterm_{r}"].item() for r in m.regions}
    assert terms == pytest.approx(
        {"UCfg": 0.524057, "UCbg": 0.210721, "US": 0.334715, "DC": 1.609438, "DS": 0.693147}, abs=TOL
    )
    assert stats["n_UCfg"].item() == 2 and stats["ce_UCfg"].item() == pytest.approx(0.393043, abs=TOL)


def test_foreground_weight_diagnostics_hand_computed():
    # pseudo-labels a1 b0 c1 d1 e0 f1; per-voxel weights w_R / (|R| + 1): UCfg {a, f} 4/3, UCbg {b} 4/2,
    # US {c} 3/2, DC {d} 2/2, DS {e} 1/2
    m = _loss()
    _, stats = m.unlabeled_loss(_logits(SUP), _logits(REF), update=False)
    assert {r: stats[f"nfg_{r}"].item() for r in m.regions} == {"UCfg": 2, "UCbg": 0, "US": 1, "DC": 1, "DS": 0}
    assert stats["wvox_fg"].item() == pytest.approx(2 * 4 / 3 + 3 / 2 + 1, abs=TOL)
    assert stats["wvox_bg"].item() == pytest.approx(2 + 1 / 2, abs=TOL)
    counter = RegionCounter("u", m.regions)
    counter.add(stats)
    out = counter.summary()
    assert [out[f"u_fgfrac_{r}"] for r in m.regions] == [1.0, 0.0, 1.0, 1.0, 0.0]
    # mean weight of a foreground voxel (5.1667 / 4) over that of a background one (2.5 / 2)
    assert out["u_fg_weight"] == pytest.approx((5.0 + 1 / 6) / 4 / 1.25, abs=TOL)


def test_foreground_weight_measures_the_implicit_class_weight_of_region_means():
    # 1 foreground voxel alone in DC, 99 background voxels in UC: region means give the foreground voxel
    # w_DC / (1 + 1) = 1 against w_UC / (99 + 1) = 0.04 for a background one, 25 times as much, although
    # DC's region weight is half of UC's
    m = _loss(split_uc=False)
    ref = torch.zeros(1, 2, 10, 10)
    ref[:, 0] = 5.0  # background, confident
    ref[0, :, 0, 0] = torch.tensor([-5.0, 5.0])  # foreground, confident
    sup = ref.clone()
    sup[0, :, 0, 0] = torch.tensor([5.0, -5.0])  # the supervised net disagrees there -> DC
    m.threshold_set("ref_u").tau.fill_(0.5)
    _, stats = m.unlabeled_loss(sup, ref, update=False)
    assert [stats[f"n_{r}"].item() for r in m.regions] == [99, 0, 1, 0]
    counter = RegionCounter("u", m.regions)
    counter.add(stats)
    assert counter.summary()["u_fg_weight"] == pytest.approx(25.0, rel=1e-5)
    # a plain voxel mean (everything in one region) weighs every voxel alike
    _, same = m.unlabeled_loss(ref, ref, update=False)
    plain = RegionCounter("u", m.regions)
    plain.add(same)
    assert plain.summary()["u_fg_weight"] == pytest.approx(1.0, rel=1e-5)
    # no foreground target at all: undefined, NaN (not 0 or inf)
    bg = RegionCounter("u", m.regions)
    bg.add(m.unlabeled_loss(torch.zeros(1, 2, 3, 3) + torch.tensor([1.0, 0.0]).view(1, 2, 1, 1),
                            torch.zeros(1, 2, 3, 3) + torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), update=False)[1])
    assert math.isnan(bg.summary()["u_fg_weight"])


@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_t3_t4_batch_pooling_2d_3d(batch, three_d):
    m = _loss()
    loss, stats = m.unlabeled_loss(_logits(SUP, batch, three_d), _logits(REF, batch, three_d), update=False)
    assert loss.item() == pytest.approx(_expected_unlabeled(batch), abs=TOL)
    if batch == 2:
        assert loss.item() == pytest.approx(4.426230, abs=TOL)
    assert [stats[f"n_{r}"].item() for r in m.regions] == [2 * batch, batch, batch, batch, batch]


def test_t4_2d_equals_3d_masks_and_loss():
    m = _loss()
    l2, _ = m.unlabeled_loss(_logits(SUP), _logits(REF), update=False)
    l3, _ = m.unlabeled_loss(_logits(SUP, three_d=True), _logits(REF, three_d=True), update=False)
    assert l2.item() == l3.item()
    masks = []
    for three_d in (False, True):
        _, rp, rc = softmax_stats(_logits(REF, three_d=three_d))
        _, sp, _ = softmax_stats(_logits(SUP, three_d=three_d))
        masks.append(_masks_as_lists(quadripartition(sp, rp, rc, rp, torch.tensor(TAU_REF_U))))
    assert masks[0] == masks[1]
    assert quadripartition(sp, rp, rc, rp, torch.tensor(TAU_REF_U))["UCfg"].shape == (1, 1, 2, 3)


def test_t5_strict_greater():
    zr, zs = _logits(REF), _logits(SUP)
    _, ref_pred, ref_conf = softmax_stats(zr)
    _, sup_pred, _ = softmax_stats(zs)
    tau = torch.tensor(TAU_REF_U)
    tau[1] = ref_conf[0, 0, 0]  # exact float32 q~ at voxel a
    regions = quadripartition(sup_pred, ref_pred, ref_conf, ref_pred, tau)
    assert not regions["UCfg"][0, 0, 0] and regions["US"][0, 0, 0]
    # d and f share a's exact q~ = 0.9 at class 1, so they move too (f to US, d from DC to DS)
    got = _masks_as_lists(regions)
    assert got["US"] == [True, False, True, False, False, True]
    assert got["DS"] == [False, False, False, True, True, False]
    assert not any(got["UCfg"]) and not any(got["DC"])
    # one float32 ulp below q~ restores the T1 regions
    tau[1] = torch.nextafter(ref_conf[0, 0, 0], torch.tensor(0.0))
    assert _masks_as_lists(quadripartition(sup_pred, ref_pred, ref_conf, ref_pred, tau))["UCfg"] == [
        g == "UCfg" for g in U_REGION
    ]
    # through the loss object
    m = _loss()
    m.threshold_set("ref_u").tau.copy_(torch.tensor([TAU_REF_U[0], ref_conf[0, 0, 0].item()]))
    _, stats = m.unlabeled_loss(zs, zr, update=False)
    assert stats["n_UCfg"].item() == 0 and stats["n_US"].item() == 3 and stats["n_DS"].item() == 2


def test_t6_no_uc_split():
    m = _loss(split_uc=False)
    loss, stats = m.unlabeled_loss(_logits(SUP), _logits(REF), update=False)
    assert m.regions == ("UC", "US", "DC", "DS")
    assert set(k[2:] for k in stats if k.startswith("n_")) == {"UC", "US", "DC", "DS"}
    assert stats["n_UC"].item() == 3
    assert stats["wterm_UC"].item() == pytest.approx(4 * 0.498404 / 4, abs=TOL)
    assert loss.item() == pytest.approx(3.135704, abs=TOL)


def test_t7_gradients():
    zr = _logits(REF).requires_grad_(True)
    zs = _logits(SUP).requires_grad_(True)
    loss, _ = _loss().unlabeled_loss(zs, zr, update=False)
    loss.backward()
    assert zr.grad is None or torch.count_nonzero(zr.grad) == 0
    scale = {"UCfg": 4 / 3, "UCbg": 4 / 2, "US": 3 / 2, "DC": 2 / 2, "DS": 1 / 2}
    p = torch.tensor(SUP)  # (6, 2)
    t = torch.tensor([1, 0, 1, 1, 0, 1])  # argmax ref
    expected = torch.stack([scale[U_REGION[i]] * (p[i] - torch.nn.functional.one_hot(t[i], 2)) for i in range(6)])
    got = zs.grad.reshape(2, 6).T
    assert torch.allclose(got, expected.float(), atol=TOL)
    assert torch.allclose(got[0], torch.tensor([4 / 3 * 0.25, -4 / 3 * 0.25]), atol=TOL)


# ------------------------------------------------------------------------------------------------
# Thresholds (T8-T10)
# ------------------------------------------------------------------------------------------------
def test_t8_tau_update_then_same_regions():
    m = MetaSSLLoss(2, weights_preset="uniform", w_unlabeled=W4321)
    _, stats = m.unlabeled_loss(_logits(SUP), _logits(REF), update=True)
    tau = m.threshold_set("ref_u").tau
    assert tau.dtype == torch.float32
    assert tau.tolist() == pytest.approx([0.5 * 1.4 / 3 + 0.45, 0.795], abs=TOL)
    assert tau[0].item() == pytest.approx(0.683333, abs=TOL)
    assert [stats[f"n_{r}"].item() for r in m.regions] == [2, 1, 1, 1, 1]
    loss_again, _ = m.unlabeled_loss(_logits(SUP), _logits(REF), update=False)
    assert loss_again.item() == pytest.approx(3.372078, abs=TOL)
    assert m.threshold_set("ref_u").num_updates.item() == 1


@pytest.mark.parametrize("skip, tau0", [(True, 0.9), (False, 0.45)])
def test_t9_absent_class(skip, tau0):
    th = ClassThresholds(2, skip_absent=skip)
    valid = torch.tensor([[True, False, True], [True, False, True]]).unsqueeze(0)  # {a, c, d, f}
    th.update_from_logits(_logits(REF), valid)
    assert th.tau.tolist() == pytest.approx([tau0, 0.795], abs=TOL)
    assert th.absent_updates.tolist() == [1, 0]


def test_t10_ignore_in_labeled_tau():
    m = _loss()
    m.labeled_loss(_logits(SUP), _logits(REF), _target(), ignore_label=IGNORE, update=True)
    assert m.threshold_set("sup_l").tau.tolist() == pytest.approx([0.733333, 0.7375], abs=TOL)
    # counting f would give tau_1 = 0.5 * 3.2 / 5 + 0.45 = 0.77
    th = ClassThresholds(2)
    th.update_from_logits(_logits(SUP))
    assert th.tau[1].item() == pytest.approx(0.77, abs=TOL)


def test_tau_max_clamps_only_at_use():
    th = ClassThresholds(3, init=0.95, tau_max=0.9)
    assert th.effective().tolist() == pytest.approx([0.9] * 3)
    assert th.tau.tolist() == pytest.approx([0.95] * 3)
    m = MetaSSLLoss(2, tau_max=0.8, tau_init=0.95)
    d = m.threshold_diagnostics()
    assert d["tau_ref_u_0"] == pytest.approx(0.95) and d["tau_eff_ref_u_1"] == pytest.approx(0.8)
    assert d["tau_absent_sup_l_1"] == 0.0
    assert "tau_eff_ref_u_0" not in MetaSSLLoss(2).threshold_diagnostics()


def test_class_thresholds_state_dict_round_trip():
    th = ClassThresholds(2, skip_absent=True)
    th.update_from_logits(_logits(REF), torch.tensor([[[True, False, True], [True, False, True]]]))
    sd = th.state_dict()
    assert set(sd) == {"tau", "absent_updates", "num_updates"}
    fresh = ClassThresholds(2)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.tau, th.tau) and fresh.tau.dtype == torch.float32
    assert fresh.absent_updates.tolist() == [1, 0] and fresh.num_updates.item() == 1


def test_metassl_state_dict_restores_lazily_created_sets():
    m = MetaSSLLoss(2, tau_sets=())
    m.unlabeled_loss(_logits(SUP), _logits(REF), tau_set="2_u")
    m.labeled_loss(_logits(SUP), _logits(REF), _target(), IGNORE, sup_set="1_l")
    sd = m.state_dict()
    assert {"sets.2_u.tau", "sets.1_l.tau"} <= set(sd)
    fresh = MetaSSLLoss(2, tau_sets=())
    fresh.load_state_dict(sd)  # strict: no missing/unexpected keys
    assert torch.equal(fresh.threshold_set("2_u").tau, m.threshold_set("2_u").tau)
    assert fresh.threshold_set("1_l").tau.tolist() == pytest.approx([0.733333, 0.7375], abs=TOL)
    # nested inside another module (how a trainer may hold it)
    parent = torch.nn.Module()
    parent.metassl = MetaSSLLoss(2, tau_sets=())
    parent.load_state_dict({f"metassl.{k}": v for k, v in sd.items()})
    assert torch.equal(parent.metassl.sets["2_u"].tau, m.sets["2_u"].tau)


# ------------------------------------------------------------------------------------------------
# Labeled variants (T11, T12), precision (T15), edge cases (T16), shadow (T17), CPS (T18)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channel_axis", [False, True])
def test_t11_labeled_released(channel_axis):
    m = _loss(labeled_regions="released")
    m.threshold_set("sup_l").tau.copy_(torch.tensor([0.85, 0.78]))
    y = _target()
    if channel_axis:
        y = y.unsqueeze(1).float()  # nnU-Net's (B, 1, *S) layout
    zs = _logits(SUP).requires_grad_(True)
    loss, stats = m.labeled_loss(zs, _logits(REF), y, ignore_label=IGNORE, update=False)
    assert [stats[f"n_{r}"].item() for r in m.regions] == [1, 1, 1, 0, 2]  # c, b, a, -, {d, e}
    assert {r: stats[f"wterm_{r}"].item() for r in m.regions} == pytest.approx(
        {"UCfg": 0.446287, "UCbg": 0.210721, "US": 0.431523, "DC": 0.0, "DS": 0.536479}, abs=TOL
    )
    assert loss.item() == pytest.approx(1.625011, abs=TOL)
    loss.backward()
    assert torch.count_nonzero(zs.grad[0, :, 1, 2]) == 0  # f (ignore) gets no gradient


def test_t11_regions_masks_directly():
    _, rp, _ = softmax_stats(_logits(REF))
    _, sp, sc = softmax_stats(_logits(SUP))
    valid = _target() != IGNORE
    regions = _masks_as_lists(quadripartition(sp, rp, sc, sp, torch.tensor([0.85, 0.78]), valid))
    assert regions["US"] == [True] + [False] * 5
    assert regions["UCbg"] == [False, True] + [False] * 4
    assert regions["UCfg"] == [False, False, True, False, False, False]
    assert regions["DS"] == [False, False, False, True, True, False]
    assert not any(regions["DC"])


def test_t12_labeled_figure():
    m = _loss(labeled_regions="figure")
    m.threshold_set("ref_l").tau.copy_(torch.tensor([0.70, 0.85]))
    loss, stats = m.labeled_loss(_logits(SUP), _logits(REF), _target(), ignore_label=IGNORE, update=False)
    assert [stats[f"n_{r}"].item() for r in m.regions] == [1, 1, 2, 1, 0]  # a, b, {c, e}, d, -
    assert {r: stats[f"wterm_{r}"].item() for r in m.regions} == pytest.approx(
        {"UCfg": 0.575364, "UCbg": 0.210721, "US": 1.609438, "DC": 0.223144, "DS": 0.0}, abs=TOL
    )
    assert loss.item() == pytest.approx(2.618667, abs=TOL)
    # with update, figure refreshes the reference's labeled set (from p~ without f), never sup_l
    m.labeled_loss(_logits(SUP), _logits(REF), _target(), ignore_label=IGNORE, update=True)
    assert m.threshold_set("ref_l").tau.tolist() == pytest.approx(
        [0.5 * 0.70 + 0.5 * 1.4 / 3, 0.5 * 0.85 + 0.5 * 2.55 / 4], abs=TOL
    )
    assert "sup_l" not in m.sets


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_t15_half_precision_logits(dtype):
    g = torch.Generator().manual_seed(0)
    zs = (torch.randn(2, 3, 4, 5, generator=g) * 3).to(dtype)
    zr = (torch.randn(2, 3, 4, 5, generator=g) * 3).to(dtype)
    y = torch.randint(0, 3, (2, 4, 5), generator=g)
    for variant in ("released", "figure"):
        lo = MetaSSLLoss(3, labeled_regions=variant)
        hi = MetaSSLLoss(3, labeled_regions=variant)
        lu_h, _ = lo.unlabeled_loss(zs, zr)
        lu_f, _ = hi.unlabeled_loss(zs.float(), zr.float())
        ll_h, _ = lo.labeled_loss(zs, zr, y)
        ll_f, _ = hi.labeled_loss(zs.float(), zr.float(), y)
        assert lu_h.dtype == ll_h.dtype == torch.float32
        assert lu_h.item() == pytest.approx(lu_f.item(), abs=1e-6)
        assert ll_h.item() == pytest.approx(ll_f.item(), abs=1e-6)
        assert torch.equal(lo.state_dict()["sets.ref_u.tau"], hi.state_dict()["sets.ref_u.tau"])


def test_t15_under_cpu_autocast_bf16():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g)
    w_s = torch.randn(3, 4, 1, 1, generator=g, requires_grad=True)
    w_r = torch.randn(3, 4, 1, 1, generator=g)
    y = torch.randint(0, 3, (2, 6, 6), generator=g)
    ref_m, auto_m = MetaSSLLoss(3), MetaSSLLoss(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zs = torch.nn.functional.conv2d(x, w_s)
        zr = torch.nn.functional.conv2d(x, w_r)
        assert zs.dtype == torch.bfloat16
        lu, _ = auto_m.unlabeled_loss(zs, zr)
        ll, _ = auto_m.labeled_loss(zs, zr, y)
    assert lu.dtype == ll.dtype == torch.float32
    lu_f, _ = ref_m.unlabeled_loss(zs.detach().float(), zr.float())
    ll_f, _ = ref_m.labeled_loss(zs.detach().float(), zr.float(), y)
    assert lu.item() == pytest.approx(lu_f.item(), abs=1e-6)
    assert ll.item() == pytest.approx(ll_f.item(), abs=1e-6)
    (lu + ll).backward()
    assert w_s.grad is not None and torch.isfinite(w_s.grad).all() and w_s.grad.abs().sum() > 0


def test_t16_empty_regions_and_all_ignore():
    z = _logits(SUP).requires_grad_(True)
    m = _loss()
    loss, stats = m.unlabeled_loss(z, z.detach().clone(), update=True)
    assert torch.isfinite(loss)
    assert stats["n_DC"].item() == 0 and stats["n_DS"].item() == 0
    assert stats["wterm_DC"].item() == 0.0 and stats["wterm_DS"].item() == 0.0
    assert stats["n_UCfg"].item() + stats["n_UCbg"].item() + stats["n_US"].item() == 6
    y = torch.full((1, 2, 3), IGNORE)
    for variant in ("released", "figure"):
        zs = _logits(SUP).requires_grad_(True)
        mv = _loss(labeled_regions=variant)
        before = {k: v.clone() for k, v in mv.state_dict().items()}
        loss, stats = mv.labeled_loss(zs, _logits(REF), y, ignore_label=IGNORE)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        loss.backward()
        assert zs.grad is not None and torch.count_nonzero(zs.grad) == 0
        assert all(stats[f"n_{r}"].item() == 0 for r in mv.regions)
        name = "sup_l" if variant == "released" else "ref_l"
        assert torch.equal(mv.state_dict()[f"sets.{name}.tau"], before[f"sets.{name}.tau"])  # all absent: skipped
    counter = RegionCounter("l", m.regions)
    counter.add(stats)
    assert all(math.isnan(v) for k, v in counter.summary().items() if "_frac_" in k or "_ce_" in k)


def test_t17_shadow_diagnostics():
    m = _loss()
    before = m.threshold_set("ref_u").tau.clone()
    stats = m.shadow_diagnostics(_logits(SUP), _logits(REF), _target(), ignore_label=IGNORE)
    assert torch.equal(m.threshold_set("ref_u").tau, before)  # no update
    assert {r: (stats[f"n_{r}"].item(), stats[f"correct_{r}"].item()) for r in m.regions} == {
        "UCfg": (1, 1),
        "UCbg": (1, 1),
        "US": (1, 1),
        "DC": (1, 0),
        "DS": (1, 1),
    }
    counter = RegionCounter("shadow", m.regions)
    counter.add(stats)
    s = counter.summary()
    assert s["shadow_acc_DC"] == 0.0
    for r in m.regions:
        assert s[f"shadow_frac_{r}"] == pytest.approx(1 / 5)
        if r != "DC":
            assert s[f"shadow_acc_{r}"] == 1.0


@pytest.mark.parametrize("variant", ["released", "figure"])
def test_t18_cps_symmetry(variant):
    g = torch.Generator().manual_seed(2)
    z1u, z2u = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    z1l, z2l = torch.randn(1, 3, 2, 4, 4, generator=g), torch.randn(1, 3, 2, 4, 4, generator=g)
    y = torch.randint(0, 3, (1, 1, 2, 4, 4), generator=g)
    sets = ("1_u", "2_u", "1_l", "2_l")

    def directional(net1_u, net2_u, net1_l, net2_l):
        m = MetaSSLLoss(3, labeled_regions=variant, tau_sets=sets)
        # direction 1: net 1 learns from net 2 (net 2's tau); direction 2 mirrors it
        l1 = m.unlabeled_loss(net1_u, net2_u, tau_set="2_u")[0] + m.labeled_loss(
            net1_l, net2_l, y, sup_set="1_l", ref_set="2_l"
        )[0]
        l2 = m.unlabeled_loss(net2_u, net1_u, tau_set="1_u")[0] + m.labeled_loss(
            net2_l, net1_l, y, sup_set="2_l", ref_set="1_l"
        )[0]
        return l1, l2, m

    a1, a2, ma = directional(z1u, z2u, z1l, z2l)
    b1, b2, mb = directional(z2u, z1u, z2l, z1l)
    assert a1.item() == b2.item() and a2.item() == b1.item()
    assert a1.item() != a2.item()
    assert torch.equal(ma.sets["1_u"].tau, mb.sets["2_u"].tau)
    assert torch.equal(ma.sets["1_l"].tau, mb.sets["2_l"].tau)


# ------------------------------------------------------------------------------------------------
# Misc API behaviour
# ------------------------------------------------------------------------------------------------
def test_region_weighted_ce_never_indexes_ignore_and_grads_only_logits():
    z = _logits(SUP).requires_grad_(True)
    target = torch.tensor([[[1, 0, 1], [0, 0, 255]]])  # out-of-range ignore value at f
    _, rp, rc = softmax_stats(_logits(REF))
    _, sp, _ = softmax_stats(z.detach())
    regions = quadripartition(sp, rp, rc, rp, torch.tensor(TAU_REF_U), valid=target != 255)
    loss, stats = region_weighted_ce(z, target, regions, W4321)
    assert torch.isfinite(loss) and stats["n_UCfg"].item() == 1
    loss.backward()
    assert torch.count_nonzero(z.grad[0, :, 1, 2]) == 0


def test_shape_errors():
    m = MetaSSLLoss(2)
    with pytest.raises(ValueError, match="same shape"):
        m.unlabeled_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"\(B, 2, \*spatial\)"):
        m.unlabeled_loss(torch.zeros(1, 3, 3, 3), torch.zeros(1, 3, 3, 3))
    with pytest.raises(ValueError, match="target"):
        m.labeled_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="'.'"):
        m.threshold_set("a.b")


def test_region_counter_counts_then_divides():
    m = _loss()
    counter = RegionCounter("u", m.regions, suffix="_1")
    _, s1 = m.unlabeled_loss(_logits(SUP), _logits(REF), update=False)  # 6 voxels
    _, s3 = m.unlabeled_loss(_logits(SUP, 3), _logits(REF, 3), update=False)  # 18 voxels
    counter.add(s1)
    counter.add(s3)
    out = counter.summary()
    assert list(out) == counter.keys()
    assert "u_frac_UCfg_1" in out and "u_wterm_DS_1" in out
    assert out["u_frac_UCfg_1"] == pytest.approx((2 + 6) / 24)
    # mean CE over the pooled voxels of the region, not a mean of per-batch means
    assert out["u_ce_UCfg_1"] == pytest.approx(4 * 0.393043 / 8, abs=TOL)
    assert out["u_wterm_DS_1"] == pytest.approx(
        (s1["wterm_DS"].item() + s3["wterm_DS"].item()) / 2, abs=TOL
    )
    assert counter.counts()["batches"] == 2.0
    # differs from averaging per-batch ratios when batches carry different shadow counts
    sh = RegionCounter("shadow", ("UC", "DC"))
    sh.add({"n_UC": torch.tensor(1), "correct_UC": torch.tensor(0), "n_DC": torch.tensor(1), "correct_DC": 1})
    sh.add({"n_UC": torch.tensor(9), "correct_UC": torch.tensor(9), "n_DC": torch.tensor(0), "correct_DC": 0})
    s = sh.summary()
    assert s["shadow_acc_UC"] == pytest.approx(0.9) and s["shadow_frac_UC"] == pytest.approx(10 / 11)
    assert s["shadow_acc_DC"] == 1.0
    sh.all_reduce()  # no-op outside torch.distributed
    assert sh.summary() == s
    sh.reset()
    assert math.isnan(sh.summary()["shadow_acc_UC"])
    with pytest.raises(KeyError, match="n_UC"):
        sh.add({})
    with pytest.raises(ValueError, match="'x'"):
        RegionCounter("x", ("UC",))


# ------------------------------------------------------------------------------------------------
# DDP: (s_c, n_c) all-reduced before the EMA, on two gloo CPU processes
# ------------------------------------------------------------------------------------------------
def _ddp_data():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3, 5, 5, generator=g) * 2
    logits[:2, 2] -= 100.0  # class 2 absent from rank 0's half, present in rank 1's
    logits[2:, 2, 0, 0] += 100.0
    return logits


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits = _ddp_data()[2 * rank : 2 * rank + 2]
        th = ClassThresholds(3)
        th.update_from_logits(logits)
        counter = RegionCounter("shadow", ("UC",))
        counter.add({"n_UC": torch.tensor(rank + 1), "correct_UC": torch.tensor(rank)})
        counter.all_reduce()
        torch.save({"tau": th.tau, "absent": th.absent_updates, "counts": counter.counts()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_ddp_all_reduce_matches_single_process_union():
    import torch.multiprocessing as mp

    expected = ClassThresholds(3)
    expected.update_from_logits(_ddp_data())
    local = ClassThresholds(3)
    local.update_from_logits(_ddp_data()[:2])
    assert local.tau[2].item() == pytest.approx(0.9)  # absent locally: rank 0 alone would skip it
    assert expected.tau[2].item() != pytest.approx(0.9)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(f"{out_dir}/rank{r}.pt") for r in range(2)]
    for res in results:
        assert torch.allclose(res["tau"], expected.tau, atol=1e-7)
        assert res["absent"].tolist() == [0, 0, 0]
        assert res["counts"] == {"n_UC": 3.0, "correct_UC": 1.0, "batches": 2.0}


# ------------------------------------------------------------------------------------------------
# Section 13: UC modes, normalisation, released-script presets (hand-computed on the T2 / T11 example)
# CE per voxel vs the reference argmax: a 0.287682, b 0.105361, c 0.223144, d 1.609438, e 1.386294,
# f 0.105361; regions a UCfg, b UCbg, c US, d DC, e DS, f UCfg; weights (UC, US, DC, DS) = (4, 3, 2, 1).
# ------------------------------------------------------------------------------------------------
def _mode_loss(**kw) -> MetaSSLLoss:
    m = MetaSSLLoss(2, weights_preset="uniform", w_unlabeled=W4321, w_labeled=W4321, **kw)
    m.threshold_set("ref_u").tau.copy_(torch.tensor(TAU_REF_U))
    return m


def test_t2_released_2d_counts_confident_background_twice_and_foreground_never():
    m = _mode_loss(uc_mode="released_2d")
    assert m.regions == ("UCfg", "UCbg", "US", "DC", "DS")
    assert m.region_weights_unlabeled == {"UCfg": 0.0, "UCbg": 8.0, "US": 3.0, "DC": 2.0, "DS": 1.0}
    zs = _logits(SUP).requires_grad_(True)
    loss, stats = m.unlabeled_loss(zs, _logits(REF), update=False)
    # UCbg 8 * 0.105361 / 2 + US 3 * 0.223144 / 2 + DC 2 * 1.609438 / 2 + DS 1 * 1.386294 / 2
    assert loss.item() == pytest.approx(3.058742, abs=TOL)
    assert {r: stats[f"wterm_{r}"].item() for r in m.regions} == pytest.approx(
        {"UCfg": 0.0, "UCbg": 0.421442, "US": 0.334716, "DC": 1.609438, "DS": 0.693147}, abs=TOL
    )
    assert stats["n_UCfg"].item() == 2  # still counted for the diagnostics
    loss.backward()
    # confidently agreed foreground (a, f) gets no gradient at all; b gets 8 / 2 * (p - onehot)
    assert torch.count_nonzero(zs.grad[0, :, 0, 0]) == 0 and torch.count_nonzero(zs.grad[0, :, 1, 2]) == 0
    assert zs.grad[0, :, 0, 1].tolist() == pytest.approx([4 * (0.9 - 1), 4 * 0.1], abs=TOL)


@pytest.mark.parametrize("uc_mode", ["split", "joint"])
def test_voxel_mean_divides_every_region_by_the_valid_voxel_count(uc_mode):
    m = _mode_loss(uc_mode=uc_mode, normalization="voxel_mean")
    zs = _logits(SUP).requires_grad_(True)
    loss, _ = m.unlabeled_loss(zs, _logits(REF), update=False)
    # (4 (a + b + f) + 3 c + 2 d + 1 e) / (6 + 1): UC's split does not matter when both halves weigh w_UC
    assert loss.item() == pytest.approx(7.268218 / 7, abs=TOL)
    loss.backward()
    # every voxel's gradient is w_R / 7 * (p - onehot): a (UC) 4/7, c (US) 3/7
    assert zs.grad[0, :, 0, 0].tolist() == pytest.approx([4 / 7 * 0.25, -4 / 7 * 0.25], abs=TOL)
    assert zs.grad[0, :, 0, 2].tolist() == pytest.approx([3 / 7 * 0.2, -3 / 7 * 0.2], abs=TOL)


def test_voxel_mean_with_released_2d_uc():
    m = _mode_loss(uc_mode="released_2d", normalization="voxel_mean")
    loss, _ = m.unlabeled_loss(_logits(SUP), _logits(REF), update=False)
    assert loss.item() == pytest.approx((8 * 0.105361 + 3 * 0.223144 + 2 * 1.609438 + 1.386294) / 7, abs=TOL)
    assert loss.item() == pytest.approx(0.873926, abs=TOL)


@pytest.mark.parametrize("normalization", ["region_mean", "voxel_mean"])
def test_all_uc_batch_gives_the_same_value_in_both_normalisations(normalization):
    # sup = ref and thresholds 0.5: every voxel is confidently agreed (one joint UC region);
    # CE = -ln q~: 0.9, 0.8, 0.75, 0.9, 0.6, 0.9 -> sum 1.337735, times 4 / (6 + 1)
    m = _mode_loss(uc_mode="joint", normalization=normalization)
    m.threshold_set("ref_u").tau.fill_(0.5)
    loss, stats = m.unlabeled_loss(_logits(REF), _logits(REF), update=False)
    assert stats["n_UC"].item() == 6
    assert loss.item() == pytest.approx(4 * 1.337735 / 7, abs=TOL)


@pytest.mark.parametrize(
    "kw, fg_weight",
    [
        # region means: fg a, f 4/3, c 3/2, d 1 vs bg b 2, e 1/2 (see the test above)
        ({}, (2 * 4 / 3 + 3 / 2 + 1) / 4 / ((2 + 1 / 2) / 2)),
        # released 2D: a, f weigh 0; b 8/2
        ({"uc_mode": "released_2d"}, (0 + 0 + 3 / 2 + 1) / 4 / ((4 + 1 / 2) / 2)),
        # voxel mean: the weights w_R / 7 alone: fg (4 + 4 + 3 + 2) / 4, bg (4 + 1) / 2 -> 1.3
        ({"normalization": "voxel_mean"}, 1.3),
    ],
)
def test_foreground_weight_diagnostic_in_every_mode(kw, fg_weight):
    m = _mode_loss(**kw)
    _, stats = m.unlabeled_loss(_logits(SUP), _logits(REF), update=False)
    counter = RegionCounter("u", m.regions)
    counter.add(stats)
    assert counter.summary()["u_fg_weight"] == pytest.approx(fg_weight, abs=TOL)


@pytest.mark.parametrize(
    "kw, total",
    [
        # T11 regions: a US, b UCbg, c UCfg, d DS, e DS (f ignored); labeled CE vs y*: a 0.287682, b 0.105361,
        # c 0.223144, d 0.223144, e 1.386294
        ({"uc_mode": "released_2d"}, 8 * 0.105361 / 2 + 3 * 0.287682 / 2 + 0.0 + (0.223144 + 1.386294) / 3),
        ({"normalization": "voxel_mean"},
         (3 * 0.287682 + 4 * 0.105361 + 4 * 0.223144 + 0.223144 + 1.386294) / (5 + 1)),
    ],
)
def test_t11_labeled_loss_in_other_modes(kw, total):
    m = _mode_loss(labeled_regions="released", **kw)
    m.threshold_set("sup_l").tau.copy_(torch.tensor([0.85, 0.78]))
    loss, _ = m.labeled_loss(_logits(SUP), _logits(REF), _target(), ignore_label=IGNORE, update=False)
    assert loss.item() == pytest.approx(total, abs=TOL)


def test_released_script_presets():
    from nnunet_ssl.algorithms.metassl import LOSS_PRESETS, loss_preset

    assert set(LOSS_PRESETS) == {"released_mt_2d", "released_cps_2d", "released_3d"}
    mt = MetaSSLLoss.from_preset("released_mt_2d", 2)
    assert (mt.uc_mode, mt.normalization, mt.labeled_regions) == ("released_2d", "region_mean", "released")
    assert mt.region_weights_unlabeled == pytest.approx({"UCfg": 0, "UCbg": 100, "US": 40, "DC": 0.2048, "DS": 6.4})
    assert mt.region_weights_labeled == pytest.approx(
        {"UCfg": 0, "UCbg": 100, "US": 50 / 1.4, "DC": 50 / 1.4**3, "DS": 50 / 1.4**2})
    cps = MetaSSLLoss.from_preset("released_cps_2d", 2)
    assert cps.region_weights_unlabeled["UCbg"] == pytest.approx(100) and cps.region_weights_unlabeled["UCfg"] == 0
    assert cps.region_weights_labeled["UCbg"] == pytest.approx(170)
    assert cps.region_weights_unlabeled["DS"] == pytest.approx(50 * math.exp(-(1.8**3)))
    d3 = MetaSSLLoss.from_preset("released_3d", 2)
    assert d3.uc_mode == "split"
    assert d3.region_weights_labeled == pytest.approx({"UCfg": 50, "UCbg": 50, "US": 50 / 1.5, "DC": 50 / 1.5**3,
                                                       "DS": 50 / 1.5**2})
    # the released MT-2D loss on the T2 example: UCbg 100 b / 2 + US 40 c / 2 + DC 0.2048 d / 2 + DS 6.4 e / 2
    mt.threshold_set("ref_u").tau.copy_(torch.tensor(TAU_REF_U))
    loss, _ = mt.unlabeled_loss(_logits(SUP), _logits(REF), update=False)
    assert loss.item() == pytest.approx(
        100 * 0.105361 / 2 + 40 * 0.223144 / 2 + 0.2048 * 1.609438 / 2 + 6.4 * 1.386294 / 2, abs=1e-4)
    # overrides win over the preset; the preset dict is a copy
    assert MetaSSLLoss.from_preset("released_3d", 2, normalization="voxel_mean").normalization == "voxel_mean"
    loss_preset("released_3d")["uc_mode"] = "joint"
    assert LOSS_PRESETS["released_3d"]["uc_mode"] == "split"


def test_mode_errors_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"uc_mode 'both'.*split.*released_2d.*joint"):
        MetaSSLLoss(2, uc_mode="both")
    with pytest.raises(ValueError, match=r"normalization 'mean'.*region_mean.*voxel_mean"):
        MetaSSLLoss(2, normalization="mean")
    with pytest.raises(ValueError, match="split_uc=False contradicts uc_mode='split'"):
        MetaSSLLoss(2, split_uc=False, uc_mode="split")
    with pytest.raises(ValueError, match=r"loss preset 'released_mt'.*released_mt_2d"):
        MetaSSLLoss.from_preset("released_mt", 2)
    # the legacy switch still maps onto the modes
    assert MetaSSLLoss(2, split_uc=False).uc_mode == "joint" and MetaSSLLoss(2).uc_mode == "split"


# ------------------------------------------------------------------------------------------------
# Explicit unlabeled target (BCP's LCC-filtered pseudo-label)
# ------------------------------------------------------------------------------------------------
def test_explicit_target_equal_to_the_reference_argmax_changes_nothing():
    m = _loss()
    loss, stats = m.unlabeled_loss(_logits(SUP), _logits(REF), update=False)
    y_ref = torch.tensor([[[1, 0, 1], [1, 0, 1]]])  # argmax of REF, voxels a-f
    for target in (y_ref, y_ref[:, None].float()):  # (B, *S) or nnU-Net's (B, 1, *S) float labels
        loss_t, stats_t = m.unlabeled_loss(_logits(SUP), _logits(REF), update=False, target=target)
        assert loss_t.item() == loss.item()
        assert {k: v.item() for k, v in stats_t.items()} == {k: v.item() for k, v in stats.items()}


def test_explicit_target_moves_overridden_voxels_by_the_reference_probability_of_the_target():
    m = _loss()
    # f: foreground island set to background (as the LCC filter does); e: background relabelled foreground.
    # f: y^ = 1 != t = 0, p~[0] = 0.10 <= tau_0 = 0.70 -> DS, CE = -ln p(0) = -ln 0.10.
    # e: y^ = 1 == t = 1, p~[1] = 0.40 <= tau_1 = 0.85 -> US, CE = -ln p(1) = -ln 0.75.
    target = torch.tensor([[[1, 0, 1], [1, 1, 0]]])
    loss, stats = m.unlabeled_loss(_logits(SUP), _logits(REF), update=False, target=target)
    counts = {r: stats[f"n_{r}"].item() for r in m.regions}
    assert counts == {"UCfg": 1, "UCbg": 1, "US": 2, "DC": 1, "DS": 1}
    ce_a, ce_b, ce_c, ce_d = -math.log(0.75), -math.log(0.90), -math.log(0.80), -math.log(0.20)
    ce_e, ce_f = -math.log(0.75), -math.log(0.10)
    expected = 4 * ce_a / 2 + 4 * ce_b / 2 + 3 * (ce_c + ce_e) / 3 + 2 * ce_d / 2 + 1 * ce_f / 2
    assert loss.item() == pytest.approx(expected, abs=TOL)
    assert stats["nfg_US"].item() == 2 and stats["nfg_DS"].item() == 0  # foreground share follows the target


def test_explicit_target_is_read_on_valid_voxels_only_and_tau_follows_the_reference():
    valid = torch.tensor([[[True, True, True], [True, True, False]]])
    target = torch.tensor([[[1, 0, 1], [1, 0, 2]]])  # 2: an ignore value outside the valid region
    with_t, without = _loss(), _loss()
    loss_t, stats_t = with_t.unlabeled_loss(_logits(SUP), _logits(REF), valid=valid, target=target)
    loss, stats = without.unlabeled_loss(_logits(SUP), _logits(REF), valid=valid)
    assert loss_t.item() == loss.item() and sum(stats_t[f"n_{r}"].item() for r in with_t.regions) == 5
    # tau from the reference (y~, q~) on the valid voxels a-e, not from the target
    torch.testing.assert_close(with_t.sets["ref_u"].tau, without.sets["ref_u"].tau, rtol=0, atol=0)
    # class 0: b, e (0.8, 0.6); class 1: a, c, d (0.9, 0.75, 0.9); m_c = s_c / (n_c + 1), momentum 0.5
    expected = [0.5 * 0.70 + 0.5 * 1.4 / 3, 0.5 * 0.85 + 0.5 * 2.55 / 4]
    assert with_t.sets["ref_u"].tau.tolist() == pytest.approx(expected, abs=1e-6)
