import math

import pytest
import torch
from torch import nn

from drcl.model.memory import KeyQueue, momentum_at, momentum_update


def test_queue_fills_then_wraps_in_fifo_order():
    q = KeyQueue(size=5, dim=2)
    assert q.valid()[0].shape == (0, 2)
    q.enqueue(torch.tensor([[1.0, 1], [2, 2], [3, 3]]), torch.tensor([1, 2, 3]))
    keys, labels = q.valid()
    assert keys[:, 0].tolist() == [1, 2, 3] and labels.tolist() == [1, 2, 3]
    q.enqueue(torch.tensor([[4.0, 4], [5, 5], [6, 6]]))  # 6 overwrites the oldest slot
    keys, labels = q.valid()
    assert int(q.filled) == 5 and int(q.ptr) == 1
    assert keys[:, 0].tolist() == [6, 2, 3, 4, 5]
    assert labels.tolist() == [-1, 2, 3, -1, -1]


def test_queue_batch_larger_than_queue_keeps_the_newest():
    q = KeyQueue(size=3, dim=1)
    q.enqueue(torch.arange(7.0).view(7, 1))
    assert sorted(q.valid()[0].view(-1).tolist()) == [4, 5, 6]


def test_queue_is_saved_with_the_model():
    q = KeyQueue(size=4, dim=2)
    q.enqueue(torch.ones(3, 2))
    r = KeyQueue(size=4, dim=2)
    r.load_state_dict(q.state_dict())
    assert int(r.filled) == 3 and int(r.ptr) == 3 and torch.equal(r.keys, q.keys)


def test_momentum_update_is_the_ema_formula():
    torch.manual_seed(0)
    online, mom = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.clone() for p in mom.parameters()]
    momentum_update(online, mom, 0.9)
    for b, p_o, p_m in zip(before, online.parameters(), mom.parameters()):
        torch.testing.assert_close(p_m, 0.9 * b + 0.1 * p_o)


def test_momentum_schedule_is_cosine_from_base_to_one():
    assert momentum_at(0.0) == pytest.approx(0.99)
    assert momentum_at(1.0) == pytest.approx(1.0)
    assert momentum_at(0.5) == pytest.approx(1 - 0.01 * (math.cos(math.pi * 0.5) + 1) / 2)
    assert momentum_at(2.0) == pytest.approx(1.0)
