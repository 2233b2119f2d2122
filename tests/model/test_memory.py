import math

import pytest
import torch

from drcl.model.memory import KeyQueue, momentum_at, staleness


def test_queue_fills_then_wraps_in_fifo_order():
    q = KeyQueue(size=5, dim=2)
    assert q.valid()[0].shape == (0, 2)
    q.enqueue(torch.tensor([[1.0, 1], [2, 2], [3, 3]]), torch.tensor([1, 2, 3]), torch.tensor([10, 20, 30]))
    keys, labels, ids = q.valid()
    assert keys[:, 0].tolist() == [1, 2, 3] and labels.tolist() == [1, 2, 3] and ids.tolist() == [10, 20, 30]
    q.enqueue(torch.tensor([[4.0, 4], [5, 5], [6, 6]]))  # 6 overwrites the oldest slot
    keys, labels, ids = q.valid()
    assert int(q.filled) == 5 and int(q.ptr) == 1
    assert keys[:, 0].tolist() == [6, 2, 3, 4, 5]
    assert labels.tolist() == [-1, 2, 3, -1, -1]
    assert ids.tolist() == [-1, 20, 30, -1, -1]  # a key's id travels with it


def test_queue_batch_larger_than_queue_keeps_the_newest():
    q = KeyQueue(size=3, dim=1)
    q.enqueue(torch.arange(7.0).view(7, 1))
    assert sorted(q.valid()[0].view(-1).tolist()) == [4, 5, 6]
    q.enqueue(torch.arange(7.0).view(7, 1), torch.arange(7), torch.arange(7) + 100)
    keys, labels, ids = q.valid()
    assert labels.tolist() == keys.view(-1).long().tolist()  # labels and ids stay with their keys
    assert ids.tolist() == (keys.view(-1).long() + 100).tolist() and sorted(labels.tolist()) == [4, 5, 6]


def test_queue_is_saved_with_the_model():
    q = KeyQueue(size=4, dim=2)
    q.enqueue(torch.ones(3, 2))
    r = KeyQueue(size=4, dim=2)
    r.load_state_dict(q.state_dict())
    assert int(r.filled) == 3 and int(r.ptr) == 3 and torch.equal(r.keys, q.keys) and torch.equal(r.ids, q.ids)


def test_loaded_queue_uses_and_continues_the_saved_keys():
    """Resuming: a queue loaded into a fresh (or already used) module holds the saved keys
    and writes the next ones after the newest saved key, not over the oldest slots."""
    q = KeyQueue(size=4, dim=1)
    q.enqueue(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1, 2, 3]), torch.tensor([10, 20, 30]))
    r = KeyQueue(size=4, dim=1)
    r.load_state_dict(q.state_dict())
    assert r.fill == 3
    keys, labels, ids = r.valid()
    assert keys.view(-1).tolist() == [1, 2, 3] and labels.tolist() == [1, 2, 3] and ids.tolist() == [10, 20, 30]
    r.enqueue(torch.tensor([[4.0], [5.0]]))
    assert r.valid()[0].view(-1).tolist() == [5, 2, 3, 4] and r.fill == 4 and int(r.ptr) == 1
    used = KeyQueue(size=4, dim=1)
    used.enqueue(torch.tensor([[9.0]]))  # host counters (1, 1) before loading
    used.load_state_dict(q.state_dict())
    assert used.fill == 3 and used.valid()[0].view(-1).tolist() == [1, 2, 3]


def test_momentum_update_of_drcl_is_the_ema_of_each_online_parameter_by_name():
    from drcl.model.drcl import DRCL, DRCLConfig

    torch.manual_seed(0)
    model = DRCL(DRCLConfig(hcl_queue=4, lcl_queue=4))
    with torch.no_grad():  # make online and momentum differ everywhere
        for p in model.online.parameters():
            p.add_(torch.randn_like(p))
    online = dict(model.online.named_parameters())
    before = {n: p.clone() for n, p in model.momentum.named_parameters()}
    buffers = {n: b.clone() for n, b in model.momentum.named_buffers()}
    assert set(before) == set(online)  # projectors are in both; predictors and decoder are not
    model.momentum_update(0.9)
    for name, p in model.momentum.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * online[name], msg=name)
    for name, b in model.momentum.named_buffers():
        assert torch.equal(b, buffers[name]), name  # BN statistics are the momentum encoder's own


def test_momentum_schedule_is_cosine_from_base_to_one():
    assert momentum_at(0.0) == pytest.approx(0.99)
    assert momentum_at(1.0) == pytest.approx(1.0)
    assert momentum_at(0.5) == pytest.approx(1 - 0.01 * (math.cos(math.pi * 0.5) + 1) / 2)
    assert momentum_at(2.0) == pytest.approx(1.0)


def test_staleness_is_queue_age_against_momentum_horizon():
    # the docstring's MoCo v2 numbers: 65,536 keys at 256 a step are 256 steps old; m = 0.999
    # averages over 1,000 steps
    age, horizon = staleness(65536, 256, 0.999)
    assert age == pytest.approx(256) and horizon == pytest.approx(1000)
    assert staleness(4096, 64, 0.99) == (pytest.approx(64), pytest.approx(100))
    assert staleness(10, 5, 1.0)[1] == math.inf
