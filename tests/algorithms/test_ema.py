import pytest
import torch
from torch import nn

from nnunet_ssl.algorithms.ema import EMA


def _pair():
    torch.manual_seed(0)
    s = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    t = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    t.load_state_dict(s.state_dict())
    with torch.no_grad():
        for p in s.parameters():
            p.add_(1.0)
        s[1].running_mean.fill_(2.0)
        s[1].num_batches_tracked.fill_(7)
    return s, t


def test_decay_warmup_values():
    ema = EMA(0.99, warmup=True)
    assert ema.decay_at(0) == 0.0
    assert ema.decay_at(1) == pytest.approx(0.5)
    assert ema.decay_at(9) == pytest.approx(0.9)
    assert ema.decay_at(10_000) == pytest.approx(0.99)
    assert EMA(0.99, warmup=False).decay_at(0) == 0.99


def test_update_values_and_copy_policy():
    s, t = _pair()
    before = [p.clone() for p in t.parameters()]
    d = EMA(0.9, warmup=False, buffer_policy="copy").update(t, s, step=100)
    assert d == 0.9
    for p_t, p_old, p_s in zip(t.parameters(), before, s.parameters()):
        torch.testing.assert_close(p_t, 0.9 * p_old + 0.1 * p_s)
    torch.testing.assert_close(t[1].running_mean, torch.full((2,), 2.0))  # copied, not averaged
    assert int(t[1].num_batches_tracked) == 7


def test_ema_buffer_policy_averages_float_buffers_only():
    s, t = _pair()
    EMA(0.9, warmup=False, buffer_policy="ema").update(t, s, step=5)
    torch.testing.assert_close(t[1].running_mean, torch.full((2,), 0.2))  # 0.9*0 + 0.1*2
    assert int(t[1].num_batches_tracked) == 7  # integer buffers are always copied


def test_first_step_with_warmup_copies_student():
    s, t = _pair()
    EMA(0.99).update(t, s, step=0)
    for p_t, p_s in zip(t.parameters(), s.parameters()):
        torch.testing.assert_close(p_t, p_s)


def test_no_gradient_flows_and_bad_arguments():
    s, t = _pair()
    for p in t.parameters():
        p.requires_grad_(False)
    EMA(0.5).update(t, s, step=3)
    assert all(p.grad is None for p in t.parameters())
    with pytest.raises(ValueError, match="buffer_policy"):
        EMA(0.9, buffer_policy="mean")
    with pytest.raises(ValueError, match="decay"):
        EMA(1.5)
