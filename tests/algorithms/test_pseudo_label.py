"""Confidence-weighted pseudo-label CE (ACTION spec 2.7, 9.8)."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.algorithms.losses.pseudo_label import confidence_weighted_ce, confidence_weights


def test_weights_and_loss_toy():
    # B = 2, 2 classes, 2x2 voxels
    logits = torch.zeros(2, 2, 2, 2)
    logits[0, 1] = math.log(3.0)  # p = (0.25, 0.75) everywhere in case 0
    labels = torch.tensor([[[1, 1], [0, 0]], [[0, 1], [0, 1]]], dtype=torch.uint8)
    conf = torch.tensor([[[0.99, 0.98], [0.5, 0.97]], [[0.1, 0.2], [0.3, 0.4]]], dtype=torch.float16)
    w = confidence_weights(conf, 0.97)
    assert w.tolist() == [0.75, 0.0]
    loss = confidence_weighted_ce(logits, labels, conf, 0.97)
    l_case0 = [-math.log(0.75)] * 2 + [-math.log(0.25)] * 2
    expected = 0.75 * sum(l_case0) / 8  # all 8 voxels have CE > 0; case 1 has weight 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.dtype == torch.float32


def test_zero_ce_voxels_leave_the_denominator():
    logits = torch.tensor([[[200.0, 0.0]], [[0.0, 0.0]]]).view(1, 2, 1, 2)  # voxel 0 certain (CE = 0)
    labels = torch.tensor([[[0, 1]]])
    conf = torch.ones(1, 1, 2)
    loss = confidence_weighted_ce(logits, labels, conf)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)  # averaged over the one voxel with CE > 0


def test_3d_matches_formula_and_autocast():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 3, 4, 5, requires_grad=True)
    labels = torch.randint(0, 3, (2, 3, 4, 5))
    conf = torch.rand(2, 3, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = confidence_weighted_ce(logits, labels, conf, 0.5)
    ce = F.cross_entropy(logits.detach(), labels, reduction="none")
    w = (conf >= 0.5).flatten(1).float().mean(1)
    ref = (w.view(2, 1, 1, 1) * ce * (ce > 0)).sum() / (ce > 0).sum()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert logits.grad is not None
