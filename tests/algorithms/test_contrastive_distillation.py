"""Similarity KL (spec 9.1, 9.2) and window embeddings (spec 9.3)."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_ssl.algorithms.contrastive.distillation import (flatten_windows, pooled_grid, similarity_kl,
                                                            window_embeddings, windows_from_grid)
from nnunet_ssl.algorithms.contrastive.heads import GlobalHead
from nnunet_ssl.algorithms.contrastive.memory_bank import FIFOQueue


def test_kl_direction_toy_values():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    valid = torch.ones(2, dtype=torch.bool)
    z_s = torch.tensor([[1.0, 0.0]], requires_grad=True)
    z_t = torch.tensor([[1.0, 0.0]], requires_grad=True)
    predictor = torch.nn.Identity()
    loss = similarity_kl(predictor(z_s), z_t, anchors, valid, tau_s=1.0, tau_t=0.5)
    p_t = torch.softmax(z_t.detach() @ anchors.t() / 0.5, 1)
    p_s = torch.softmax(z_s.detach() @ anchors.t() / 1.0, 1)
    assert torch.allclose(p_t, torch.tensor([[0.8808, 0.1192]]), atol=1e-4)
    assert torch.allclose(p_s, torch.tensor([[0.7311, 0.2689]]), atol=1e-4)
    assert loss.item() == pytest.approx(0.06713, abs=1e-4)
    reverse = (p_s * (p_s.log() - p_t.log())).sum().item()
    assert reverse == pytest.approx(0.08261, abs=1e-4)
    assert abs(loss.item() - reverse) > 0.01
    # torch's own batchmean KL agrees
    ref = F.kl_div(torch.log_softmax(z_s.detach() @ anchors.t(), 1), p_t, reduction="batchmean")
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    loss.backward()
    assert z_t.grad is None
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0


def test_teacher_head_gets_no_gradient():
    torch.manual_seed(0)
    student, teacher = GlobalHead(8, 4), GlobalHead(8, 4)
    x = torch.randn(3, 8, 5, 5)
    anchors = F.normalize(torch.randn(6, 4), dim=1)
    loss = similarity_kl(F.normalize(student(x), dim=1), F.normalize(teacher(x), dim=1), anchors,
                         torch.ones(6, dtype=torch.bool), 0.1, 0.01)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_masked_partly_filled_queue_equals_filled_rows():
    torch.manual_seed(1)
    q = FIFOQueue(size=10, dim=4, ddp_gather=False)
    q.enqueue(F.normalize(torch.randn(6, 4), dim=1))
    q.data[6:] = 123.0  # garbage in unfilled rows must not matter
    zs = F.normalize(torch.randn(5, 4), dim=1).requires_grad_(True)
    zt = F.normalize(torch.randn(5, 4), dim=1)
    masked = similarity_kl(zs, zt, q.data, q.valid_mask(), 0.1, 0.01)
    alone = similarity_kl(zs, zt, q.data[:6], torch.ones(6, dtype=torch.bool), 0.1, 0.01)
    assert masked.item() == pytest.approx(alone.item(), rel=1e-6)
    masked.backward()
    assert torch.isfinite(zs.grad).all()


def test_empty_queue_gives_zero_and_chunks_agree():
    zs = F.normalize(torch.randn(7, 3), dim=1).requires_grad_(True)
    zt = F.normalize(torch.randn(7, 3), dim=1)
    anchors = F.normalize(torch.randn(5, 3), dim=1)
    zero = similarity_kl(zs, zt, anchors, torch.zeros(5, dtype=torch.bool), 0.1, 0.01)
    assert zero.item() == 0.0 and zero.requires_grad
    valid = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    full, stats = similarity_kl(zs, zt, anchors, valid, 0.1, 0.01, return_stats=True)
    chunked = similarity_kl(zs, zt, anchors, valid, 0.1, 0.01, chunk_size=3)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    assert 0.0 <= stats["entropy_t"].item() <= math.log(3) + 1e-6
    assert 0.0 <= stats["entropy_s"].item() <= math.log(3) + 1e-6


def test_kl_autocast_safe_fp32():
    zs = F.normalize(torch.randn(4, 8), dim=1).bfloat16()
    zt = F.normalize(torch.randn(4, 8), dim=1).bfloat16()
    anchors = F.normalize(torch.randn(6, 8), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = similarity_kl(zs, zt, anchors, torch.ones(6, dtype=torch.bool), 0.1, 0.01)
    assert loss.dtype == torch.float32


def _crop_then_pool(z, cells):
    spatial = z.shape[2:]
    n = len(spatial)
    pool = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[n]
    win = [s // 4 for s in spatial]
    stride = [s // 8 for s in spatial]
    grids = torch.meshgrid(*[torch.arange(7)] * n, indexing="ij")
    positions = list(zip(*[g.reshape(-1).tolist() for g in grids]))
    crops = []
    for b in range(z.shape[0]):
        for pos in positions:
            sl = tuple(slice(p * st, p * st + w) for p, st, w in zip(pos, stride, win))
            crops.append(z[(b, slice(None)) + sl])
    pooled = pool(torch.stack(crops), (cells,) * n)  # one window per row of the stack
    return F.normalize(pooled.flatten(1), dim=1)


@pytest.mark.parametrize("shape,cells", [((2, 3, 32, 64), 8), ((1, 2, 16, 16, 32), 4)])
def test_pooled_grid_equals_crop_then_pool(shape, cells):
    torch.manual_seed(2)
    z = torch.randn(shape)
    rows = window_embeddings(z, cells)
    n = len(shape) - 2
    assert rows.shape == (shape[0] * 7 ** n, shape[1] * cells ** n)
    assert torch.allclose(rows.norm(dim=1), torch.ones(rows.shape[0]), atol=1e-5)
    assert torch.allclose(rows, _crop_then_pool(z, cells), atol=1e-5)
    assert pooled_grid(z, cells).shape[2:] == (4 * cells,) * n


@pytest.mark.parametrize("n", [2, 3])
def test_distinct_constant_windows_give_constant_rows(n):
    # windows tensor (B, W.., C, P..) with one constant per (b, window): the flattened rows must be
    # constant and in (b, window) order; the code's reshape flaw would mix windows into a row
    b, c, p, nw = 2, 3, 2, 7
    consts = torch.arange(1, b * nw ** n + 1, dtype=torch.float32).view(b, *([nw] * n))
    w = consts.view(*consts.shape, 1, *([1] * n)).expand(*consts.shape, c, *([p] * n)).contiguous()
    rows = flatten_windows(w, n, normalize=False)
    assert rows.shape == (b * nw ** n, c * p ** n)
    assert torch.equal(rows, consts.reshape(-1, 1).expand_as(rows))
    # through the grid path: a grid whose cells equal their window's constant in channel-major layout
    grid = torch.zeros(b, c, *([4 * p] * n))
    rows2 = windows_from_grid(grid + 1.0, p)
    assert torch.allclose(rows2, torch.full_like(rows2, 1.0 / math.sqrt(c * p ** n)))


def test_window_rows_follow_grid_layout():
    # 2D, P=2: grid 8x8, windows of 2x2 cells at stride 1 -> row (b, i, j) = grid[b, :, i:i+2, j:j+2]
    grid = torch.randn(2, 3, 8, 8)
    rows = windows_from_grid(grid, 2, normalize=False)
    assert rows.shape == (2 * 49, 3 * 4)
    for b, i, j in [(0, 0, 0), (1, 3, 5), (1, 6, 6)]:
        assert torch.equal(rows[b * 49 + i * 7 + j], grid[b, :, i:i + 2, j:j + 2].reshape(-1))
