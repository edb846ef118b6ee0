"""The RECO loss against a direct computation of its formula, on one and two workers."""

from __future__ import annotations

import math
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.loss import RecoLoss


def _unit(seed: int, n: int = 6, d: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def _nce_by_hand(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    """-1/2n sum_i [log softmax_j(s a_i.b_j)_i + log softmax_j(s b_i.a_j)_i], with loops."""
    n = len(a)
    total = 0.0
    for i in range(n):
        row = [scale * float(a[i] @ b[j]) for j in range(n)]
        col = [scale * float(b[i] @ a[j]) for j in range(n)]
        total -= row[i] - math.log(sum(math.exp(x) for x in row))
        total -= col[i] - math.log(sum(math.exp(x) for x in col))
    return total / (2 * n)


def test_loss_equals_formula():
    v, t, v_ref, t_ref = (_unit(s) for s in range(4))
    log_scale = torch.tensor(math.log(1 / 0.07))
    got = RecoLoss()(v, t, v_ref, t_ref, log_scale).item()
    s = 1 / 0.07
    a = {name: x.numpy().astype(np.float64) for name, x in dict(v=v, t=t, vr=v_ref, tr=t_ref).items()}
    want = (_nce_by_hand(a["vr"], a["tr"], s) + _nce_by_hand(a["vr"], a["t"], s)
            + _nce_by_hand(a["v"], a["tr"], s))
    assert abs(got - want) < 1e-4 * want
    # The loss is not symmetric in its roles: swapping refined and frozen changes it.
    assert abs(RecoLoss()(v_ref, t_ref, v, t, log_scale).item() - got) > 1e-3


def test_temperature_gradient_flows():
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    RecoLoss()(*(_unit(s) for s in range(4)), log_scale).backward()
    assert log_scale.grad is not None and log_scale.grad.abs() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    full = [_unit(s, n=8).requires_grad_() for s in range(4)]
    rows = slice(4 * rank, 4 * rank + 4)
    local = [x.detach()[rows].clone().requires_grad_() for x in full]
    log_scale = torch.tensor(2.0)
    loss = RecoLoss()(*local, log_scale)
    loss.backward()
    results[rank] = (loss.item(), [x.grad for x in local])
    dist.destroy_process_group()


def test_two_workers_see_the_global_batch():
    """Each worker's loss is the global batch's; its rows get the global gradient's rows."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
    full = [_unit(s, n=8).requires_grad_() for s in range(4)]
    loss = RecoLoss()(*full, torch.tensor(2.0))
    loss.backward()
    for rank in range(2):
        value, grads = results[rank]
        assert abs(value - loss.item()) < 1e-5
        for g, x in zip(grads, full):
            torch.testing.assert_close(g, x.grad[4 * rank:4 * rank + 4], atol=1e-6, rtol=1e-5)
