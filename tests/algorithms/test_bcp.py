"""BCP building blocks (specs/bcp.md section 5, tests T1-T12 with the spec's hand-computed values)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_ssl.algorithms.bcp import (Box, bcp_pairs, bidirectional_mix, box_sides, copy_paste,
                                       largest_component_per_class, pretrain_mix, random_box, region_targets,
                                       region_targets_ds, resize_nearest, stage_boundary)
from nnunet_ssl.algorithms.ema import EMA

LN3 = math.log(3.0)
IGN = 2  # C = 2 classes and no dataset ignore label: IGN = C


# ---------------------------------------------------------------- T1 sides and starts
@pytest.mark.parametrize("spatial, sides", [((6, 9), (4, 6)), ((3, 6, 9), (2, 4, 6)), ((256, 256), (170, 170)),
                                            ((112, 112, 80), (74, 74, 53)), ((1, 9), (1, 6))])
def test_t1_sides(spatial, sides):
    assert box_sides(spatial) == sides
    assert box_sides(spatial, 2 / 3) == sides  # the float 2/3 gives the exact integers too


def test_t1_explicit_starts_give_the_box():
    box = random_box((6, 9), starts=(1, 2))
    m = box.mask()
    assert m.shape == (6, 9) and m.dtype == torch.bool and int(m.sum()) == 24
    assert m.any(1).nonzero().squeeze(1).tolist() == [1, 2, 3, 4]
    assert m.any(0).nonzero().squeeze(1).tolist() == [2, 3, 4, 5, 6, 7]
    assert box.volume_fraction == pytest.approx(24 / 54)


def test_t1_every_legal_start_is_reachable_and_no_other():
    Box((256,), (170,), (86,))  # touches the high border: legal (the released code never draws it)
    with pytest.raises(ValueError, match="does not fit"):
        Box((256,), (170,), (87,))
    g = torch.Generator().manual_seed(3)
    starts = {random_box((256,), generator=g).starts[0] for _ in range(3000)}
    assert starts == set(range(87))


def test_box_fraction_is_validated():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        box_sides((8, 8), 0.0)
    assert box_sides((8, 8), 1.0) == (8, 8)


# ---------------------------------------------------------------- T2 seeded
def test_t2_seeded_starts():
    g = torch.Generator().manual_seed(0)
    assert random_box((6, 9), generator=g).starts == (2, 3)
    assert random_box((6, 9), generator=g).starts == (2, 0)
    assert random_box((3, 6, 9), generator=torch.Generator().manual_seed(0)).starts == (0, 0, 1)
    assert random_box((112, 112, 80), generator=torch.Generator().manual_seed(0)).starts == (29, 15, 21)


# ---------------------------------------------------------------- T3 mixing
def _t3():
    lab = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3)
    unl = lab + 100
    mask = random_box((3, 3), starts=(0, 1)).mask()
    return lab, unl, mask


def test_t3_mixing_values():
    lab, unl, mask = _t3()
    assert random_box((3, 3), starts=(0, 1)).sides == (2, 2)
    assert mask.flatten().nonzero().squeeze(1).tolist() == [1, 2, 4, 5]
    x_lu, x_ul = bidirectional_mix(mask, lab, unl, bcp_pairs(1, 1))
    assert x_lu[0, 0].tolist() == [[100, 1, 2], [103, 4, 5], [106, 107, 108]]
    assert x_ul[0, 0].tolist() == [[0, 101, 102], [3, 104, 105], [6, 7, 8]]
    assert torch.equal(x_lu + x_ul, lab + unl)


def test_copy_paste_keeps_dtype_broadcasts_and_checks_shapes():
    mask = random_box((4, 5, 6), starts=(1, 1, 2)).mask()
    a = torch.ones(2, 3, 4, 5, 6, dtype=torch.float16)
    out = copy_paste(mask, a, torch.zeros_like(a))
    assert out.dtype == torch.float16 and torch.equal(out[1, 2].bool(), mask)
    labels = copy_paste(mask, torch.full((2, 1, 4, 5, 6), 3, dtype=torch.uint8),
                        torch.zeros(2, 1, 4, 5, 6, dtype=torch.uint8))
    assert labels.dtype == torch.uint8 and int(labels.sum()) == 3 * 2 * int(mask.sum())
    with pytest.raises(ValueError, match="do not match"):
        copy_paste(mask, a, a[:, :, :3])


# ---------------------------------------------------------------- T4 targets
Y_L = torch.tensor([[0, 1, 1], [0, 0, 0], [0, 0, 0]])
Y_U = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 0, 0]])


def test_t4_targets_and_regions():
    mask = _t3()[2]
    lab, pse = region_targets(mask, Y_L[None, None].float(), Y_U[None, None].float(), "LU", IGN)
    y_lu = torch.where(lab != IGN, lab, pse)
    assert y_lu[0, 0].long().tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert torch.equal(lab[0, 0] != IGN, mask) and torch.equal(pse[0, 0] != IGN, ~mask)  # R_lab = B
    lab, pse = region_targets(mask, Y_L[None, None].float(), Y_U[None, None].float(), "UL", IGN)
    assert torch.equal(lab[0, 0] != IGN, ~mask) and torch.equal(pse[0, 0] != IGN, mask)  # R_lab = not B
    y_ul = torch.where(lab != IGN, lab, pse)
    # y^_U is 0 inside B and y_L is 0 outside B
    assert y_ul[0, 0].long().tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert lab.dtype == torch.float32
    with pytest.raises(ValueError, match="direction"):
        region_targets(mask, Y_L[None, None], Y_U[None, None], "LL", IGN)


# ---------------------------------------------------------------- T5-T7 losses (nnU-Net's DC_and_CE_loss)
def _loss(ignore_label=IGN):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


def _lu_logits(mask):
    # p1 = 0.75 inside the box and 0.25 outside: logits (0, +-ln 3)
    z1 = torch.where(mask, LN3, -LN3)
    return torch.stack([torch.zeros(3, 3), z1])[None].clone().requires_grad_(True)


def _t5_losses(y_l=Y_L):
    mask, loss = _t3()[2], _loss()
    z_lu = _lu_logits(mask)
    z_ul = torch.zeros(1, 2, 3, 3)  # p = 0.5 everywhere
    lab_lu, pse_lu = region_targets(mask, y_l[None, None].float(), Y_U[None, None].float(), "LU", IGN)
    # UL: ground truth outside the box is 0 (y_L), pseudo-label inside the box is 1
    lab_ul, pse_ul = region_targets(mask, y_l[None, None].float(), torch.ones(1, 1, 3, 3), "UL", IGN)
    return {"lab_lu": loss(z_lu, lab_lu), "pse_lu": loss(z_lu, pse_lu), "lab_ul": loss(z_ul, lab_ul),
            "pse_ul": loss(z_ul, pse_ul), "z_lu": z_lu}


def test_t5_region_losses():
    v = _t5_losses()
    assert v["lab_lu"].item() == pytest.approx(0.236987, abs=1e-5)
    assert v["pse_lu"].item() == pytest.approx(0.28518, abs=1e-5)
    assert v["lab_ul"].item() == pytest.approx(0.693143, abs=1e-5)
    assert v["pse_ul"].item() == pytest.approx(0.026480, abs=1e-5)
    sup = 0.5 * (v["lab_lu"] + v["lab_ul"])
    unsup = 0.5 * (v["pse_lu"] + v["pse_ul"])
    assert sup.item() == pytest.approx(0.465065, abs=1e-5)
    assert unsup.item() == pytest.approx(0.155829, abs=1e-5)
    for alpha, total in ((0.5, 0.542980), (0.0, 0.465065), (1.0, 0.620895)):
        assert (sup + alpha * unsup).item() == pytest.approx(total, abs=1e-5)


def test_t6_dataset_ignore_voxel():
    y = Y_L.clone()
    y[0, 1] = IGN  # inside the box: one ground-truth voxel fewer in R_lab(LU)
    assert _t5_losses(y)["lab_lu"].item() == pytest.approx(0.558550, abs=1e-5)
    y = Y_L.clone()
    y[0, 0] = IGN  # outside the box: not in R_lab(LU), and R_pse(LU) holds the pseudo-label there
    v = _t5_losses(y)
    assert v["lab_lu"].item() == pytest.approx(0.236987, abs=1e-5)
    assert v["pse_lu"].item() == pytest.approx(0.28518, abs=1e-5)


def test_t7_stage1_plain_loss():
    mask = _t3()[2]
    y_lu = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 0]])[None, None].float()
    assert _loss(None)(_lu_logits(mask), y_lu).item() == pytest.approx(0.171127, abs=1e-5)


def test_t12_no_gradient_outside_the_region():
    mask = _t3()[2]
    v = _t5_losses()
    v["lab_lu"].backward()
    g = v["z_lu"].grad[0].abs().sum(0)
    assert torch.all(g[~mask] == 0) and torch.all(g[mask] > 0)


def test_empty_region_is_constant_and_finite():
    z = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = _loss()(z, torch.full((1, 1, 3, 3), float(IGN)))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-1.0)  # nnU-Net's Dice: -(smooth / smooth)
    assert torch.all(z.grad == 0)


# ---------------------------------------------------------------- T8 LCC
def test_t8_largest_component_per_class_full_connectivity():
    y = np.array([[1, 1, 0, 0, 1], [1, 0, 0, 0, 1], [0, 0, 2, 0, 0], [0, 0, 0, 2, 0], [2, 0, 0, 0, 0]])
    out, removed, fg = largest_component_per_class(y[None])
    expected = [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 2, 0], [0, 0, 0, 0, 0]]
    assert out[0].tolist() == expected  # 4-connectivity would also drop (3, 3)
    assert (removed, fg) == (3, 8) and removed / fg == pytest.approx(3 / 8)
    assert y[4, 0] == 2  # the input is not modified


def test_t8_size_tie_keeps_the_first_component_in_c_order():
    y = torch.tensor([[[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]]], dtype=torch.int64)
    out, removed, fg = largest_component_per_class(y)
    assert torch.is_tensor(out) and out.dtype == torch.int64
    assert out[0].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert (removed, fg) == (2, 4)


def test_lcc_is_26_connected_in_3d_and_per_image():
    y = torch.zeros(2, 4, 4, 4, dtype=torch.int64)
    y[0, 0, 0, 0] = y[0, 1, 1, 1] = 1  # corner neighbours: one component
    y[0, 3, 3, 0] = 1                  # alone: dropped
    y[1, 3, 3, 0] = 1                  # the only component of image 1: kept
    out, removed, fg = largest_component_per_class(y)
    assert (removed, fg) == (1, 4)
    assert out[0, 3, 3, 0] == 0 and out[0, 0, 0, 0] == 1 and out[0, 1, 1, 1] == 1 and out[1, 3, 3, 0] == 1


# ---------------------------------------------------------------- T9 deep supervision
def test_t9_half_resolution_box():
    mask = random_box((4, 4), starts=(1, 1)).mask()
    assert random_box((4, 4), starts=(1, 1)).sides == (2, 2)
    assert resize_nearest(mask, (2, 2)).tolist() == [[True, False], [False, False]]  # samples indices 1 and 3


def test_t9_targets_are_resized_like_nnunet_resizes_labels():
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    g = torch.Generator().manual_seed(0)
    spatial = (5, 7, 6)
    y = torch.randint(0, 3, (2, 1, *spatial), generator=g).to(torch.int16)
    pseudo = torch.randint(0, 3, (2, *spatial), generator=g)
    mask = random_box(spatial, starts=(1, 2, 0)).mask()
    scales = [[1, 1, 1], [0.5, 0.5, 1], [0.25, 0.25, 0.5]]
    ds = DownsampleSegForDSTransform(scales)
    y_ds = [torch.stack(s) for s in zip(*[ds(segmentation=y[b])["segmentation"] for b in range(2)])]
    assert [t.shape[2:] for t in y_ds] == [spatial, (2, 4, 6), (1, 2, 3)]  # round(S * scale)
    lab, pse = region_targets_ds(mask, y_ds, pseudo, "UL", 3)
    full_lab, full_pse = region_targets(mask, y, pseudo[:, None], "UL", 3)
    for s in range(3):
        # nnU-Net's own downsampling of the full-resolution targets
        exp_lab = torch.stack([ds(segmentation=full_lab[b])["segmentation"][s] for b in range(2)])
        exp_pse = torch.stack([ds(segmentation=full_pse[b])["segmentation"][s] for b in range(2)])
        assert lab[s].dtype == torch.int16 and torch.equal(lab[s], exp_lab) and torch.equal(pse[s], exp_pse)
        assert torch.equal((lab[s] != 3) ^ (pse[s] != 3), torch.ones_like(lab[s], dtype=torch.bool))


def test_stage1_mix_of_every_scale():
    images = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 4, 4)
    labels = [images.clone(), images[:, :, ::2, ::2].clone()]
    mask = random_box((4, 4), starts=(1, 1)).mask()
    x, y = pretrain_mix(mask, images, labels)
    for i, j in ((0, 1), (1, 2), (2, 0)):  # T10: background i, box from (i + 1) mod 3
        assert torch.equal(x[i, 0], torch.where(mask, float(j), float(i)))
        assert torch.equal(y[0][i, 0], x[i, 0])
        assert y[1][i, 0].tolist() == [[j, i], [i, i]]
    x1, y1 = pretrain_mix(mask, images[:1], [t[:1] for t in labels])
    assert torch.equal(x1, images[:1]) and torch.equal(y1[1], labels[1][:1])  # B_l = 1: nothing mixed


# ---------------------------------------------------------------- T10 pairing
def test_t10_pairing():
    assert (bcp_pairs(4, 4).lu, bcp_pairs(4, 4).ul) == ((0, 1), (2, 3))
    assert (bcp_pairs(3, 3).lu, bcp_pairs(3, 3).ul) == ((0, 1), (2,))
    assert (bcp_pairs(1, 1).lu, bcp_pairs(1, 1).ul) == ((0,), (0,))
    p = bcp_pairs(2, 3)
    assert p.k == 2 and set(p.lu) | set(p.ul) == {0, 1}  # U_2 is never used
    with pytest.raises(ValueError, match="at least one"):
        bcp_pairs(0, 2)


def test_bidirectional_mix_uses_the_pairs():
    lab = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 3, 3)
    unl = lab + 10
    mask = random_box((3, 3), starts=(0, 0)).mask()
    x_lu, x_ul = bidirectional_mix(mask, lab, unl, bcp_pairs(4, 4))
    assert x_lu.shape[0] == x_ul.shape[0] == 2
    assert torch.equal(x_lu[1, 0], torch.where(mask, 1.0, 11.0))
    assert torch.equal(x_ul[0, 0], torch.where(mask, 12.0, 2.0))


# ---------------------------------------------------------------- T11 stages
def test_t11_stage_boundary():
    assert stage_boundary(20, 0.25) == 5
    assert stage_boundary(1000, 0.25) == 250
    assert stage_boundary(1000, 0.118) == 118
    assert stage_boundary(20, 0.0) == 0
    assert stage_boundary(2, 0.25) == 1  # halves round up
    with pytest.raises(ValueError):
        stage_boundary(10, 1.5)


# ---------------------------------------------------------------- T12 EMA
def test_t12_one_ema_step():
    teacher, student = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    nn.init.constant_(teacher.weight, 1.0)
    nn.init.constant_(student.weight, 2.0)
    EMA(0.99, warmup=False).update(teacher, student, step=0)
    assert teacher.weight.item() == pytest.approx(1.01, abs=1e-7)
