"""Video-Robin's parts on their own: FSQ, RITE, Loc-DiT (network) and the flow math."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from model import flow
from model.fsq import PlanQuantizer
from model.loc_dit import LocDiT
from model.rite import RITE


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fsq_shapes_grid_gradient_and_codebook():
    torch.manual_seed(0)
    levels = (8, 5, 5, 5)
    q = PlanQuantizer(32, levels)
    assert q.codebook_size == 1000 and q.dim == 4
    h = (3 * torch.randn(2, 7, 32)).requires_grad_(True)
    codes, idx = q(h)
    assert codes.shape == (2, 7, 4) and idx.shape == (2, 7)
    assert idx.dtype in (torch.int32, torch.int64) and 0 <= int(idx.min()) and int(idx.max()) < 1000
    # Every code is a point of the implicit codebook, and the index names that point.
    book = q.fsq.implicit_codebook
    assert book.shape == (1000, 4)
    assert torch.allclose(book[idx.long()], codes.detach(), atol=1e-6)
    # Each dimension takes at most `level` distinct values, all in [-1, 1].
    grid = [torch.unique(book[:, d]) for d in range(4)]
    assert [len(g) for g in grid] == list(levels)
    assert codes.abs().max() <= 1.0 + 1e-6
    # The full grid is the codebook: prod(levels) distinct rows.
    assert len({tuple(r.tolist()) for r in book}) == math.prod(levels)
    # Straight-through: rounding passes gradients to the projection and the input.
    codes.sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert q.proj_in.weight.grad.abs().sum() > 0


def test_rite_shape_and_causality():
    torch.manual_seed(0)
    rite = RITE(lm_hidden=24, code_dim=4, width=32, layers=2, heads=4).eval()
    codes, h = torch.randn(2, 6, 4), torch.randn(2, 6, 24)
    out = rite(codes, h)
    assert out.shape == (2, 6, 32)
    j = 3
    codes2, h2 = codes.clone(), h.clone()
    codes2[:, j] += 5.0
    h2[:, j:] = torch.randn(2, 3, 24)
    out2 = rite(codes2, h2)
    assert torch.allclose(out[:, :j], out2[:, :j], atol=1e-6)  # earlier patches never see later ones
    assert not torch.allclose(out[:, j], out2[:, j], atol=1e-3)
    # A prefix run gives the same outputs as the full run (what patch-by-patch generation relies on).
    assert torch.allclose(rite(codes[:, :4], h[:, :4]), out[:, :4], atol=1e-5)


def test_loc_dit_shape_zero_init_and_masks():
    torch.manual_seed(0)
    dit = LocDiT(channels=8, patch=4, width=32, layers=2, heads=4)
    t, plan = torch.rand(5), torch.randn(5, 32)
    prev, noisy = torch.randn(5, 4, 8), torch.randn(5, 4, 8)
    out = dit(t, plan, prev, noisy)
    assert out.shape == (5, 4, 8)
    assert torch.count_nonzero(out) == 0  # zero-initialised output projection: v = 0 before training
    for p in dit.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    dit.eval()
    prev_mask = torch.ones(5, 4, dtype=torch.bool)
    prev_mask[:, 0] = False  # first patch frame missing
    noisy_mask = torch.ones(5, 4, dtype=torch.bool)
    noisy_mask[:, 3] = False  # last frame padded
    ref = dit(t, plan, prev, noisy, prev_mask, noisy_mask)
    prev2, noisy2 = prev.clone(), noisy.clone()
    prev2[:, 0] = 100.0
    noisy2[:, 3] = -100.0
    got = dit(t, plan, prev2, noisy2, prev_mask, noisy_mask)
    # Masked frames are no keys: the real frames' outputs do not change.
    assert torch.allclose(ref[:, :3], got[:, :3], atol=1e-5)
    # Without masks they would; and the output depends on t, the plan and the previous patch.
    assert not torch.allclose(dit(t, plan, prev2, noisy2)[:, :3], ref[:, :3], atol=1e-3)
    assert not torch.allclose(dit(t.flip(0), plan, prev, noisy, prev_mask, noisy_mask), ref, atol=1e-4)
    assert not torch.allclose(dit(t, torch.zeros_like(plan), prev, noisy, prev_mask, noisy_mask), ref, atol=1e-4)
    prev3 = prev.clone()
    prev3[:, 1:] += 1.0
    assert not torch.allclose(dit(t, plan, prev3, noisy, prev_mask, noisy_mask), ref, atol=1e-4)


def test_flow_interpolation_target_and_times():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert torch.equal(flow.interpolate(x0, eps, torch.zeros(3)), x0)
    assert torch.equal(flow.interpolate(x0, eps, torch.ones(3)), eps)
    mid = flow.interpolate(x0, eps, torch.full((3,), 0.25))
    assert torch.allclose(mid, 0.75 * x0 + 0.25 * eps)
    assert torch.equal(flow.target(x0, eps), eps - x0)
    # The target is d x_t / d t.
    t = torch.full((3,), 0.4)
    fd = (flow.interpolate(x0, eps, t + 1e-3) - flow.interpolate(x0, eps, t - 1e-3)) / 2e-3
    assert torch.allclose(fd, flow.target(x0, eps), atol=1e-3)
    ts = flow.sample_t(20000, 0.0, 1.0)
    assert 0 < float(ts.min()) and float(ts.max()) < 1 and abs(float(ts.mean()) - 0.5) < 0.01
    assert abs(float(torch.logit(ts).std()) - 1.0) < 0.03  # logit-normal
    grid = flow.timesteps(4)
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        flow.timesteps(0)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_reaches_exact_answer_on_straight_field(steps):
    """The ideal rectified-flow field for one data point, v(x, t) = (x - x0) / t, is constant along the
    straight path from eps, so Euler from t = 1 to 0 lands on x0 for any number of steps."""
    torch.manual_seed(1)
    x0, eps = torch.randn(2, 6), torch.randn(2, 6)
    x = eps.clone()
    ts = flow.timesteps(steps).tolist()
    for k in range(steps):
        v = (x - x0) / ts[k]
        x = flow.euler_step(x, v, ts[k], ts[k + 1])
    assert torch.allclose(x, x0, atol=1e-5)


def test_cfg_combine_and_masked_mse():
    vc, vu = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.allclose(flow.cfg_combine(vc, vu, 1.0), vc)
    assert torch.allclose(flow.cfg_combine(vc, vu, 0.0), vu)
    assert torch.allclose(flow.cfg_combine(vc, vu, 2.0), 2 * vc - vu)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    pred, tgt = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    tgt[~mask] = 1000.0
    assert float(flow.masked_mse(pred, tgt, mask)) == pytest.approx(1.0)
