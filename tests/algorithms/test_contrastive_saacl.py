"""SAACL: centres (spec 9.9), Hungarian assignment (9.10), loss (9.11), centroid EMA, sampling."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.algorithms.contrastive.saacl import (CentreAssigner, class_centres, hungarian_assignment,
                                                     saacl_loss, sample_class_points, uniformity_energy)


@pytest.mark.parametrize("k,d", [(2, 128), (4, 128), (4, 4), (5, 4)])
def test_centres_regular_simplex(k, d):
    psi = class_centres(k, d)
    assert psi.shape == (k, d)
    p64 = psi.double()
    assert torch.allclose(p64.norm(dim=1), torch.ones(k, dtype=torch.float64), atol=1e-6)
    cos = p64 @ p64.t()
    off = cos[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1.0 / (k - 1)), atol=1e-6)
    assert torch.equal(psi, class_centres(k, d))


def test_centres_optimised_when_k_exceeds_d_plus_one():
    k, d = 6, 2
    start = F.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1)
    psi = class_centres(k, d, steps=50)
    assert torch.allclose(psi.double().norm(dim=1), torch.ones(k, dtype=torch.float64), atol=1e-6)
    assert torch.equal(psi, class_centres(k, d, steps=50))
    assert uniformity_energy(psi.double()) < uniformity_energy(start)


def test_hungarian_recovers_permuted_centres():
    psi = class_centres(4, 8)
    perm = torch.tensor([2, 0, 3, 1])
    phi = F.normalize(psi[perm] + 0.05 * torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    assert hungarian_assignment(phi, psi).tolist() == perm.tolist()
    assert hungarian_assignment(phi, psi, cost="l2").tolist() == perm.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hungarian_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    phi = F.normalize(torch.randn(4, 3, generator=g), dim=1)
    psi = F.normalize(torch.randn(4, 3, generator=g), dim=1)
    score = lambda p: sum(float(phi[c] @ psi[p[c]]) for c in range(4))  # noqa: E731
    best = max(itertools.permutations(range(4)), key=score)
    got = hungarian_assignment(phi, psi).tolist()
    assert score(got) == pytest.approx(score(best), abs=1e-9)
    assert tuple(got) == best


def test_centroid_ema_and_assignment_state():
    torch.manual_seed(0)
    assigner = CentreAssigner(num_classes=3, dim=4, momentum=0.9)
    psi = assigner.centres.clone()
    s1 = torch.randn(6, 4)
    y1 = torch.tensor([0, 0, 1, 1, 1, -1])
    assigner.update(s1, y1)
    m0 = F.normalize(F.normalize(s1[:2], dim=1).mean(0), dim=0)
    assert torch.allclose(assigner.centroids[0], m0, atol=1e-6)  # first sighting: phi = m
    assert assigner.seen.tolist() == [True, True, False]
    assert torch.all(assigner.centroids[2] == 0)
    s2 = torch.randn(2, 4)
    assigner.update(s2, torch.tensor([0, 0]))
    m0b = F.normalize(F.normalize(s2, dim=1).mean(0), dim=0)
    assert torch.allclose(assigner.centroids[0], F.normalize(0.9 * m0 + 0.1 * m0b, dim=0), atol=1e-6)
    assert assigner.perm.tolist() == hungarian_assignment(assigner.centroids, psi).tolist()
    restored = CentreAssigner(num_classes=3, dim=4)
    restored.load_state_dict(assigner.state_dict())
    for name in ("centres", "centroids", "seen", "perm"):
        assert torch.equal(getattr(restored, name), getattr(assigner, name))
    assert not math.isnan(assigner.alignment().item())


def _loop_loss(s, t, y, q, qy, qvalid, psi, perm, tau, lam):
    s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
    total = 0.0
    for i in range(s.shape[0]):
        cols = [float(s[i] @ t[i])]
        pos_cols = [0]
        for j in range(q.shape[0]):
            if qvalid[j]:
                if qy[j] == y[i]:
                    pos_cols.append(len(cols))
                cols.append(float(s[i] @ q[j]))
        centre_col = len(cols) + int(perm[y[i]])
        cols += [float(s[i] @ psi[k]) for k in range(psi.shape[0])]
        logits = [c / tau for c in cols]
        lse = math.log(sum(math.exp(v) for v in logits))
        lp = [v - lse for v in logits]
        n_i = len(pos_cols) + 1
        total += -sum(lp[p] for p in pos_cols) / n_i - lam * lp[centre_col] / n_i
    return total / s.shape[0]


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    k, d = 3, 4
    s = torch.randn(5, d, generator=g, requires_grad=True)
    t = torch.randn(5, d, generator=g)
    y = torch.tensor([0, 1, 2, 1, 0])
    q = F.normalize(torch.randn(8, d, generator=g), dim=1)
    qy = torch.tensor([0, 1, 1, 2, 0, 1, 2, 0])
    qvalid = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    psi = class_centres(k, d)
    perm = torch.tensor([1, 2, 0])
    return s, t, y, q, qy, qvalid, psi, perm


def test_saacl_equals_direct_loop():
    s, t, y, q, qy, qvalid, psi, perm = _toy()
    loss, parts = saacl_loss(s, t, y, q, qy, qvalid, psi, perm, tau=0.1, lambda_a=0.2)
    ref = _loop_loss(s.detach(), t, y, q, qy, qvalid, psi, perm, 0.1, 0.2)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert (parts["contrast"] + parts["centre"]).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_saacl_lambda_scaling_and_masking():
    s, t, y, q, qy, qvalid, psi, perm = _toy(1)
    args = dict(tau=0.5)
    l0 = saacl_loss(s, t, y, q, qy, qvalid, psi, perm, lambda_a=0.0, **args)[0].item()
    l1 = saacl_loss(s, t, y, q, qy, qvalid, psi, perm, lambda_a=1.0, **args)[0].item()
    l3 = saacl_loss(s, t, y, q, qy, qvalid, psi, perm, lambda_a=0.3, **args)[0].item()
    assert l3 - l0 == pytest.approx(0.3 * (l1 - l0), rel=1e-5)
    assert l1 > l0
    # unfilled rows (mask False) behave as if absent, whatever they contain
    masked = saacl_loss(s, t, y, q, qy, qvalid, psi, perm, lambda_a=0.2, **args)[0].item()
    alone = saacl_loss(s, t, y, q[:6], qy[:6], torch.ones(6, dtype=torch.bool), psi, perm, lambda_a=0.2,
                       **args)[0].item()
    assert masked == pytest.approx(alone, rel=1e-6)
    q_garbage = q.clone()
    q_garbage[6:] = 50.0
    garbage = saacl_loss(s, t, y, q_garbage, qy, qvalid, psi, perm, lambda_a=0.2, **args)[0].item()
    assert garbage == pytest.approx(masked, rel=1e-6)
    # padding rows labelled -1 are masked too
    qy_pad = qy.clone()
    qy_pad[2] = -1
    padded = saacl_loss(s, t, y, q, qy_pad, qvalid & (qy_pad >= 0), psi, perm, lambda_a=0.2, **args)[0].item()
    keep = torch.tensor([0, 1, 3, 4, 5])
    alone2 = saacl_loss(s, t, y, q[keep], qy[keep], torch.ones(5, dtype=torch.bool), psi, perm, lambda_a=0.2,
                        **args)[0].item()
    assert padded == pytest.approx(alone2, rel=1e-6)


@pytest.mark.parametrize("spatial", [(8, 9), (4, 5, 6)])
def test_sample_class_points(spatial):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (2, *spatial), generator=g)
    y[y == 2] = 0  # class 2 absent
    valid = torch.rand((2, *spatial), generator=g) > 0.3
    coords, labels = sample_class_points(y, valid, 3, 256, g)
    assert labels.tolist() == [0] * 256 + [1] * 256
    at = (coords[:, 0], *coords[:, 1:].t())
    assert torch.equal(y[at], labels) and valid[at].all()
    probs = torch.rand((2, 3, *spatial), generator=g)
    coords_h, labels_h = sample_class_points(y, valid, 3, 16, g, probs=probs, hard_threshold=0.7)
    at = (coords_h[:, 0], *coords_h[:, 1:].t())
    assert (probs[(coords_h[:, 0], labels_h, *coords_h[:, 1:].t())] < 0.7).all() and valid[at].all()
