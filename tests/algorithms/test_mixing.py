"""CutMix and ClassMix (ACTION spec 2.7, 9.8): identical masks, half-patch boxes, B = 1 skip."""
import pytest
import torch

from nnunet_ssl.algorithms.mixing import ClassMix, CutMix, apply_mix, partner


def _batch(b, spatial):
    # every tensor encodes its case index, so the source of each output voxel is readable
    idx = torch.arange(b, dtype=torch.float32).view(b, *([1] * (len(spatial) + 1)))
    image = idx.expand(b, 2, *spatial).clone()
    labels = idx[:, 0].expand(b, *spatial).to(torch.uint8).clone()
    conf = idx[:, 0].expand(b, *spatial).to(torch.float16).clone()
    return image, labels, conf


@pytest.mark.parametrize("spatial", [(20, 16), (10, 12, 8)])
def test_cutmix_identical_mask_and_half_box(spatial):
    b = 3
    image, labels, conf = _batch(b, spatial)
    res = CutMix()(image, labels, conf, torch.Generator().manual_seed(0))
    assert not res.skipped
    assert res.image.dtype == image.dtype and res.labels.dtype == torch.uint8 and res.confidence.dtype == torch.float16
    source = torch.where(res.mask, (torch.arange(b).view(b, *([1] * len(spatial))) + 1) % b,
                         torch.arange(b).view(b, *([1] * len(spatial))))
    assert torch.equal(res.labels.long(), source)
    assert torch.equal(res.confidence.long(), source)
    assert torch.equal(res.image[:, 0].long(), source) and torch.equal(res.image[:, 1].long(), source)
    n = len(spatial)
    for m in res.mask:
        sides = [round(s * 0.5 ** (1 / n)) for s in spatial]
        assert int(m.sum()) == torch.tensor(sides).prod().item()  # one box of the rounded sides
        for a in range(n):  # contiguous extent along each axis
            extent = m.any(dim=tuple(d for d in range(n) if d != a)).nonzero().squeeze(1)
            assert extent.numel() == sides[a] and int(extent[-1] - extent[0]) == sides[a] - 1
        frac = m.float().mean().item()
        assert abs(frac - 0.5) < 0.06  # half the patch up to rounding


def test_cutmix_placement_is_uniform_and_reproducible():
    cm = CutMix()
    m1 = cm.box_mask(200, (16, 16), torch.Generator().manual_seed(1))
    m2 = cm.box_mask(200, (16, 16), torch.Generator().manual_seed(1))
    assert torch.equal(m1, m2)
    starts = m1.any(dim=2).float().argmax(dim=1)  # first row of each box
    side = round(16 * 0.5 ** 0.5)
    assert starts.min() == 0 and starts.max() == 16 - side  # every placement is reachable


def test_batch_of_one_is_skipped():
    image, labels, conf = _batch(1, (8, 8))
    for mixer in (CutMix(), ClassMix()):
        res = mixer(image, labels, conf, torch.Generator().manual_seed(0))
        assert res.skipped and not res.mask.any()
        assert torch.equal(res.image, image) and torch.equal(res.labels, labels)


def test_classmix_pastes_half_the_partner_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 10, 10), generator=g).to(torch.uint8)
    labels[1][labels[1] == 3] = 0  # case 1 has classes {0, 1, 2}: floor(3/2) = 1 class pasted
    image = labels[:, None].float().repeat(1, 2, 1, 1)
    conf = labels.half() / 10
    res = ClassMix()(image, labels, conf, g)
    # output 0 receives exactly one whole class of case 1, with that case's labels
    pasted = torch.unique(labels[1][res.mask[0]])
    assert pasted.numel() == 1
    assert torch.equal(res.mask[0], labels[1] == pasted)
    assert torch.equal(res.labels[0][res.mask[0]], labels[1][res.mask[0]])
    assert torch.equal(res.labels[0][~res.mask[0]], labels[0][~res.mask[0]])
    # output 1 receives two of case 0's four classes
    assert torch.unique(labels[0][res.mask[1]]).numel() == 2
    assert torch.equal(res.image[:, 0], res.labels.float()) and torch.equal(res.confidence, res.labels.half() / 10)


def test_partner_and_apply_mix():
    x = torch.arange(3).view(3, 1)
    assert partner(x).view(-1).tolist() == [1, 2, 0]
    mask = torch.tensor([[True], [False], [True]])
    res = apply_mix(mask, x.view(3, 1, 1).float(), x, x.half())
    assert res.labels.view(-1).tolist() == [1, 1, 0]
