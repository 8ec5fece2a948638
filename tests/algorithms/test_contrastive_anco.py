"""AnCo: hard-query sampler (spec 9.5), negatives (9.6), toy value (9.7)."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.algorithms.contrastive.anco import (AnCoLoss, AnCoSampler, anco_logits_loss, negative_class_probs,
                                                    sample_categorical)
from nnunet_ssl.algorithms.contrastive.point_gather import gather_points


def _toy_maps(spatial, seed=0):
    """3 classes: class 0 partly hard, class 1 never hard, class 2 partly hard; some invalid pixels."""
    g = torch.Generator().manual_seed(seed)
    b = 2
    y = torch.randint(0, 3, (b, *spatial), generator=g)
    valid = torch.rand((b, *spatial), generator=g) > 0.2
    pc = torch.rand((b, *spatial), generator=g)  # probability of the labelled class
    pc[y == 1] = 0.99
    probs = torch.zeros(b, 3, *spatial)
    probs.scatter_(1, y[:, None], pc[:, None])
    return y, valid, probs


@pytest.mark.parametrize("spatial", [(12, 10), (6, 5, 4)])
def test_hard_query_sampler(spatial):
    y, valid, probs = _toy_maps(spatial)
    sampler = AnCoSampler(pool_size=64, num_queries=256)
    s = sampler(y, valid, probs, torch.Generator().manual_seed(1))
    idx = lambda c: (c[:, 0], *c[:, 1:].t())  # noqa: E731
    q = s.query_coords
    assert q.shape[1] == 1 + len(spatial)
    assert s.query_classes.tolist() == [0] * 256 + [2] * 256  # class 1 has no hard pixel: skipped
    assert torch.equal(y[idx(q)], s.query_classes)
    assert valid[idx(q)].all()
    pq = probs[(q[:, 0], s.query_classes, *q[:, 1:].t())]
    assert (pq < 0.97).all()
    # pool: 64 valid pixels of each present class, class blocks in order
    assert s.pool_classes.tolist() == [0] * 64 + [1] * 64 + [2] * 64
    assert torch.equal(y[idx(s.pool_coords)], s.pool_classes) and valid[idx(s.pool_coords)].all()
    assert s.pool_offsets[[0, 1, 2]].tolist() == [0, 64, 128]
    assert s.local_present.all()
    assert s.hard_count[1] == 0 and s.hard_count[0] > 0
    assert s.valid_count[0] == int((valid & (y == 0)).sum())


def _identity_embed(feat, spatial):
    return lambda coords: gather_points([feat], coords, spatial)


def test_skipped_class_counts_in_denominator_and_diagnostics():
    y, valid, probs = _toy_maps((12, 10))
    feat = torch.randn(2, 4, 12, 10, requires_grad=True)
    s = AnCoSampler(pool_size=64)(y, valid, probs, torch.Generator().manual_seed(1))
    loss, diag = AnCoLoss(num_negatives=16)(s, _identity_embed(feat, (12, 10)), torch.Generator().manual_seed(2))
    assert diag["num_classes"].item() == 3
    assert diag["present"].tolist() == [True, True, True]
    assert diag["skipped"].tolist() == [False, True, False]
    assert math.isnan(diag["cos_pos"][1].item()) and not math.isnan(diag["cos_pos"][0].item())
    assert diag["hard_fraction"][1].item() == 0.0 and 0 < diag["hard_fraction"][0].item() < 1
    # the loss is (term_0 + term_2) / 3: recompute the two terms with the same draws
    gen = torch.Generator().manual_seed(2)
    anco = AnCoLoss(num_negatives=16)
    embed = _identity_embed(feat, (12, 10))
    with torch.no_grad():
        pool = embed(s.pool_coords)
        protos = torch.stack([pool[s.pool_classes == c].mean(0) for c in range(3)])
    probs_neg = negative_class_probs(protos, s.local_present, 0.5)
    terms = []
    for c in (0, 2):
        rows = s.query_classes == c
        neg = anco.sample_negatives(s, probs_neg[c], int(rows.sum()), gen)
        terms.append(anco_logits_loss(embed(s.query_coords[rows]), protos[c], pool, neg, 0.5)[0])
    assert loss.item() == pytest.approx((terms[0] + terms[1]).item() / 3, rel=1e-5)
    loss.backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0


def test_negatives_never_of_query_class_and_follow_class_graph():
    torch.manual_seed(0)
    num_classes, tau = 4, 0.5
    y = torch.arange(num_classes).repeat_interleave(5).view(1, 4, 5)
    valid = torch.ones_like(y, dtype=torch.bool)
    probs = torch.full((1, num_classes, 4, 5), 0.25)
    s = AnCoSampler(pool_size=32, num_queries=8)(y, valid, probs, torch.Generator().manual_seed(0))
    protos = torch.randn(num_classes, 3)
    graph = negative_class_probs(protos, s.local_present, tau)
    assert torch.all(graph.diagonal() == 0)
    assert torch.allclose(graph.sum(1), torch.ones(num_classes))
    anco = AnCoLoss(num_negatives=512, tau=tau)
    gen = torch.Generator().manual_seed(3)
    for c in range(num_classes):
        neg = anco.sample_negatives(s, graph[c], 8, gen)
        assert neg.shape == (8, 512)
        assert not (s.pool_classes[neg] == c).any()
    # class frequencies match softmax_v(cos(r_c, r_v) / tau) over v != c within 3 sigma
    c, n = 1, 40000
    draws = sample_categorical(graph[c], n, torch.Generator().manual_seed(4))
    pn = F.normalize(protos, dim=1)
    cos = pn @ pn[c]
    others = [v for v in range(num_classes) if v != c]
    expected = torch.softmax(cos[others] / tau, 0)
    counts = torch.bincount(draws, minlength=num_classes).float()
    assert counts[c] == 0
    for v, p in zip(others, expected.tolist()):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[v].item() - n * p) <= 3 * sigma


def test_unavailable_classes_are_not_negatives():
    protos = torch.randn(4, 3)
    graph = negative_class_probs(protos, torch.tensor([True, True, False, True]), 0.5)
    assert torch.all(graph[:, 2] == 0)
    only_self = negative_class_probs(protos, torch.tensor([True, False, False, False]), 0.5)
    assert torch.all(only_self[0] == 0)


def test_fewer_than_two_classes_gives_zero():
    y = torch.zeros(1, 6, 6, dtype=torch.long)
    valid = torch.ones(1, 6, 6, dtype=torch.bool)
    valid[0, 0, 0] = False
    y[0, 0, 0] = 1  # class 1 only on an invalid pixel
    probs = torch.full((1, 2, 6, 6), 0.5)
    feat = torch.randn(1, 3, 6, 6)
    s = AnCoSampler(pool_size=16)(y, valid, probs, torch.Generator().manual_seed(0))
    loss, diag = AnCoLoss()(s, _identity_embed(feat, (6, 6)), torch.Generator().manual_seed(0))
    assert loss.item() == 0.0 and diag["num_classes"].item() == 1


def test_logits_loss_closed_form():
    # D = 2, one query, one prototype, one negative
    a, tau = 0.3, 0.5
    r = torch.tensor([[2.0, 0.0]], requires_grad=True)
    proto = torch.tensor([math.cos(a), math.sin(a)])
    pool = torch.tensor([[0.0, 3.0]])
    loss, cos_pos, cos_neg = anco_logits_loss(r, proto, pool, torch.zeros(1, 1, dtype=torch.long), tau)
    l0, l1 = math.cos(a) / tau, 0.0 / tau
    assert loss.item() == pytest.approx(-math.log(math.exp(l0) / (math.exp(l0) + math.exp(l1))), rel=1e-6)
    assert cos_pos.item() == pytest.approx(math.cos(a), rel=1e-6) and cos_neg.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert r.grad is not None


def test_toy_pipeline_closed_form():
    # class 1: one hard pixel with embedding q; class 0: confident pixels with embedding n
    theta, tau, n_neg = 1.0, 0.5, 512
    feat = torch.zeros(1, 2, 4, 4)
    feat[0, 0] = math.cos(theta)
    feat[0, 1] = math.sin(theta)
    feat[0, :, 2, 3] = torch.tensor([1.0, 0.0])
    feat.requires_grad_(True)
    y = torch.zeros(1, 4, 4, dtype=torch.long)
    y[0, 2, 3] = 1
    probs = torch.zeros(1, 2, 4, 4)
    probs[0, 0] = 1.0
    probs[0, :, 2, 3] = 0.5
    valid = torch.ones(1, 4, 4, dtype=torch.bool)
    s = AnCoSampler()(y, valid, probs, torch.Generator().manual_seed(0))
    loss, diag = AnCoLoss(num_negatives=n_neg, tau=tau)(s, _identity_embed(feat, (4, 4)),
                                                         torch.Generator().manual_seed(0))
    l0, lk = 1.0 / tau, math.cos(theta) / tau
    ce = -math.log(math.exp(l0) / (math.exp(l0) + n_neg * math.exp(lk)))
    assert loss.item() == pytest.approx(ce / 2, rel=1e-5)  # |C| = 2, class 0 skipped (no hard pixel)
    assert diag["skipped"].tolist() == [True, False]
    loss.backward()
    assert feat.grad[0, :, 2, 3].abs().sum() > 0


def test_exact_prototypes_average_all_valid_pixels():
    y, valid, probs = _toy_maps((12, 10), seed=3)
    feat = torch.randn(2, 4, 12, 10)
    embed = _identity_embed(feat, (12, 10))
    s = AnCoSampler(pool_size=32)(y, valid, probs, torch.Generator().manual_seed(1))
    anco = AnCoLoss(num_negatives=8, proto_exact=True, exact_chunk=50)
    loss, _ = anco(s, embed, torch.Generator().manual_seed(2), y=y, valid=valid)
    protos = torch.stack([feat.movedim(1, -1)[valid & (y == c)].mean(0) for c in range(3)])
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        pool = embed(s.pool_coords)
    graph = negative_class_probs(protos, s.local_present, 0.5)
    terms = []
    for c in (0, 2):
        rows = s.query_classes == c
        neg = anco.sample_negatives(s, graph[c], int(rows.sum()), gen)
        terms.append(anco_logits_loss(embed(s.query_coords[rows]), protos[c], pool, neg, 0.5)[0].item())
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-5)
