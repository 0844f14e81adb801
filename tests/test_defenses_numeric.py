"""Numeric checks of each defense's core update against formulas computed independently here."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from defenses import _engine as E
from defenses import fst, ftsam, make_config, ngf, sft
from defenses import ft as ft_mod
from zoo.data import DatasetInfo, Split
from zoo.models import SmallCNN

INFO = DatasetInfo("tiny", 1, 8, 4, (0.5,), (0.5,), hflip=True, pad=1)
CPU = torch.device("cpu")


@pytest.fixture
def clean() -> Split:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (32, 1, 8, 8), generator=g, dtype=torch.uint8)
    return Split(x, torch.arange(32) % 4)


@pytest.fixture
def model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(1, 4, width=8)


def _toy() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A two-layer MLP on a random 3-class problem, with gradients populated."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    F.cross_entropy(net(x), y).backward()
    return net, x, y


# ------------------------------------------------------------------------------------------
# FT-SAM
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [True, False])
def test_sam_perturbation_equals_its_formula_and_raises_the_loss(adaptive):
    net, x, y = _toy()
    params = list(net.parameters())
    rho = 0.05
    e = ftsam.perturbation(params, rho, adaptive)
    w = torch.cat([p.detach().flatten() for p in params])
    g = torch.cat([p.grad.flatten() for p in params])
    if adaptive:
        expected = rho * w * w * g / (torch.linalg.norm(w.abs() * g) + 1e-12)
    else:
        expected = rho * g / (torch.linalg.norm(g) + 1e-12)
    got = torch.cat([t.flatten() for t in e])
    torch.testing.assert_close(got, expected)
    # ||T_w^-1 e|| = rho: the radius in the (adaptive) metric
    scaled_norm = torch.linalg.norm(got / w.abs() if adaptive else got).item()
    assert scaled_norm == pytest.approx(rho, rel=1e-5)
    before = F.cross_entropy(net(x), y).item()
    with torch.no_grad():
        for p, t in zip(params, e):
            p.add_(t)
    assert F.cross_entropy(net(x), y).item() > before


def test_smoothed_ce_is_backdoorbench_form_not_torch_form():
    torch.manual_seed(0)
    logits, y, s = torch.randn(6, 5), torch.randint(0, 5, (6,)), 0.1
    target = torch.full((6, 5), s / 4)
    target[torch.arange(6), y] = 1 - s
    expected = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(ftsam.smoothed_ce(logits, y, s), expected)
    torch.testing.assert_close(ftsam.smoothed_ce(logits, y, 0.0), F.cross_entropy(logits, y))
    torch_form = F.cross_entropy(logits, y, label_smoothing=s)  # s/C on every class
    assert not torch.allclose(ftsam.smoothed_ce(logits, y, s), torch_form)


def test_sam_second_pass_leaves_batchnorm_statistics_alone(model, clean):
    x = torch.randn(16, 1, 8, 8)
    y = torch.arange(16) % 4
    once = copy.deepcopy(model).train()
    with torch.no_grad():
        once(x)  # exactly one BN update
    params = E.select_trainable(model, "all")
    opt = torch.optim.SGD(params, lr=0.0)
    cfg = make_config("ftsam")
    ftsam.sam_step(model, opt, params, x, y, cfg, "fp32")
    for (k, a), b in zip(model.state_dict().items(), once.state_dict().values()):
        if "running" in k:
            torch.testing.assert_close(a, b)
    for p0, p1 in zip(once.parameters(), model.parameters()):  # lr 0: w restored exactly-ish
        torch.testing.assert_close(p0, p1)


def test_bb_quirk_schedule_matches_torch_cosine_stepped_per_batch():
    cfg = make_config("ftsam", {"scheduler_granularity": "per_iter_bb_quirk", "lr": 0.01})
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    lr_at = ftsam.lr_schedule(cfg)
    for t in range(450):
        assert lr_at(t, 10) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()
    assert lr_at(400, 10) == pytest.approx(0.01)  # periodic: back at the peak after 2 T_max


# ------------------------------------------------------------------------------------------
# FST
# ------------------------------------------------------------------------------------------


def test_fst_penalty_gradient_is_alpha_times_w_ori():
    torch.manual_seed(0)
    w = torch.randn(4, 6, requires_grad=True)
    w_ori = torch.randn(4, 6)
    fst.shift_penalty(w, w_ori, 0.3).backward()
    torch.testing.assert_close(w.grad, 0.3 * w_ori)


@pytest.mark.parametrize("name", ["fst", "ft_init", "lp"])
def test_projection_keeps_head_norm_at_the_backdoored_norm(name, model, clean):
    from defenses import get_defense

    c = torch.linalg.matrix_norm(model.head.weight).item()
    cfg = make_config(name, {"epochs": 2, "batch_size": 8})
    for _ in get_defense(name).run(model, clean, INFO, cfg, seed=0, device=CPU):
        assert torch.linalg.matrix_norm(model.head.weight).item() == pytest.approx(c, rel=1e-5)


def test_without_projection_the_norm_drifts(model, clean):
    c = torch.linalg.matrix_norm(model.head.weight).item()
    cfg = make_config("fst", {"epochs": 2, "batch_size": 8, "project_head_norm": False})
    list(fst.run(model, clean, INFO, cfg, seed=0, device=CPU))
    assert abs(torch.linalg.matrix_norm(model.head.weight).item() - c) > 1e-3


def test_reinit_head_is_seeded_and_in_default_linear_range():
    a, b, c = nn.Linear(50, 3), nn.Linear(50, 3), nn.Linear(50, 3)
    E.reinit_head(a, 7), E.reinit_head(b, 7), E.reinit_head(c, 8)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    bound = 1 / math.sqrt(50)
    assert a.weight.abs().max() <= bound and a.bias.abs().max() <= bound
    assert a.weight.abs().max() > 0.8 * bound  # uses the range, not a narrower init


# ------------------------------------------------------------------------------------------
# NGF
# ------------------------------------------------------------------------------------------


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return m @ m.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def test_ngf_eigenbasis_gradient_equals_the_dense_kronecker_solve():
    gen = torch.Generator().manual_seed(0)
    out, inp, damping = 3, 5, 1e-2
    st = ngf.KFAC(A=_spd(inp, gen), G=_spd(out, gen))
    grad = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    v = ngf.natural_gradient(grad, st, damping)
    # Dense: M = (Q_A (x) Q_G) diag(vec(S) + damping) (Q_A (x) Q_G)^T, vec column-major.
    q = torch.kron(st.q_a, st.q_g)
    s = torch.outer(st.d_g, st.d_a)
    m = q @ torch.diag(s.T.reshape(-1) + damping) @ q.T

    def vec(t: torch.Tensor) -> torch.Tensor:
        return t.T.reshape(-1)

    dense = torch.linalg.solve(m, vec(grad))
    torch.testing.assert_close(vec(v), dense)
    # ... which is (A (x) G + damping I)^-1 vec(grad) when no eigenvalue is cut.
    eye = torch.eye(out * inp, dtype=torch.float64)
    exact = torch.linalg.solve(torch.kron(st.A, st.G) + damping * eye, vec(grad))
    torch.testing.assert_close(vec(v), exact)


def test_ngf_factors_running_average_and_kl_clip():
    torch.manual_seed(0)
    cfg = make_config("ngf", {"t_cov": 1, "t_inv": 1, "kl_clip": 1e-6})
    st = ngf.KFAC(A=torch.eye(4), G=torch.eye(2))
    a1, g, grad = torch.randn(8, 4), torch.randn(8, 2), torch.randn(2, 4)
    lr = 0.5
    d = ngf.ngf_precondition(st, a1, g, grad, cfg, lr)
    torch.testing.assert_close(st.A, 0.95 * torch.eye(4) + 0.05 * a1.T @ a1 / 8)
    torch.testing.assert_close(st.G, 0.95 * torch.eye(2) + 0.05 * g.T @ g / 8)
    v = ngf.natural_gradient(grad, st, cfg.damping)
    nu = min(1.0, math.sqrt(cfg.kl_clip / ((v * grad).sum().item() * lr**2)))
    assert nu < 1.0
    torch.testing.assert_close(d, nu * v)
    # the clipped step's quadratic KL estimate (lr nu)^2 V.g equals the bound
    assert nu**2 * (v * grad).sum().item() * lr**2 == pytest.approx(cfg.kl_clip, rel=1e-4)


def test_ngf_eigh_of_a_diverged_factor_does_not_raise():
    d, q = ngf._eigh(torch.full((3, 3), float("nan")))
    torch.testing.assert_close(q @ torch.diag(d) @ q.T, torch.eye(3))


def test_ngf_ewc_penalty_and_its_fisher(model, clean):
    params = E.select_trainable(model, "head")
    fisher = ngf.diag_fisher(model, params, clean, INFO, 16, CPU)
    assert [f.shape for f in fisher] == [model.head.weight.shape, model.head.bias.shape]
    assert all((f >= 0).all() for f in fisher) and fisher[0].sum() > 0
    theta0 = [p.detach().clone() for p in params]
    assert ngf.ewc_penalty(params, fisher, theta0, 2.0).item() == 0.0
    with torch.no_grad():
        model.head.bias += 1.0
    penalty = ngf.ewc_penalty(params, fisher, theta0, 2.0).item()  # (2/2) sum F_b * 1^2
    assert penalty == pytest.approx(fisher[1].sum().item(), rel=1e-5)


def test_ngf_fisher_of_all_parameters_leaves_bn_statistics_and_modes_alone(model, clean):
    params = E.select_trainable(model, "all")
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    fisher = ngf.diag_fisher(model, params, clean, INFO, 16, CPU)
    assert len(fisher) == len(params) and all(f.shape == p.shape for f, p in zip(fisher, params))
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(m.training for m in model.modules())


def test_ngf_empirical_fisher_grad_is_the_per_example_ce_gradient():
    torch.manual_seed(0)
    z = torch.randn(6, 4, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    F.cross_entropy(z, y, reduction="sum").backward()
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(ngf.fisher_grad(z, y, "empirical", gen), z.grad)


def test_ngf_true_fisher_samples_labels_from_the_model_and_changes_g():
    # A model confident in class 0 on data labelled 2: the empirical G is (p - e_2)(p - e_2)^T,
    # the true G is the softmax's Fisher E_{y~p}[(p - e_y)(p - e_y)^T] = diag(p) - p p^T.
    n = 20_000
    z = torch.tensor([[3.0, 0.0, -1.0]]).repeat(n, 1)
    y = torch.full((n,), 2)
    p = torch.softmax(z[0], 0)
    gen = torch.Generator().manual_seed(0)
    g_true = ngf.fisher_grad(z, y, "true", gen)
    sampled = (torch.softmax(z, 1) - g_true).argmax(1)  # p - g is the one-hot of the label drawn
    torch.testing.assert_close(g_true, torch.softmax(z, 1) - F.one_hot(sampled, 3).float())
    freq = torch.bincount(sampled, minlength=3).float() / n
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    exact = torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(g_true.T @ g_true / n, exact, atol=0.01, rtol=0)
    e2 = F.one_hot(torch.tensor(2), 3).float()
    g_emp = ngf.fisher_grad(z, y, "empirical", gen)
    torch.testing.assert_close(g_emp.T @ g_emp / n, torch.outer(p - e2, p - e2))
    assert (g_emp.T @ g_emp / n - exact).abs().max() > 0.5
    # ... and the factor G that the K-FAC step accumulates follows g
    cfg = make_config("ngf", {"t_cov": 1, "t_inv": 1})
    grad, a1 = torch.randn(3, 5), torch.randn(n, 5)
    states = {}
    for kind, g in (("true", g_true), ("empirical", g_emp)):
        states[kind] = ngf.KFAC(A=torch.eye(5), G=torch.eye(3))
        ngf.ngf_precondition(states[kind], a1, g, grad, cfg, 0.01)
    expected_true = 0.95 * torch.eye(3) + 0.05 * g_true.T @ g_true / n
    torch.testing.assert_close(states["true"].G, expected_true)
    assert not torch.allclose(states["true"].G, states["empirical"].G, atol=1e-2)


def test_ngf_true_fisher_changes_the_run_and_is_seeded(model, clean):
    def run(fisher, seed=0):
        m = copy.deepcopy(model)
        cfg = make_config("ngf", {"epochs": 1, "batch_size": 16, "steps_per_epoch": 3,
                                  "t_cov": 1, "t_inv": 1, "fisher": fisher})
        list(ngf.run(m, clean, INFO, cfg, seed=seed, device=CPU))
        return m.head.weight.detach() - model.head.weight.detach()  # the step taken

    assert torch.equal(run("true"), run("true"))
    step_true, step_emp = run("true"), run("empirical")
    assert (step_true - step_emp).norm() > 0.005 * step_emp.norm()  # 2% here; 0 if ignored


def test_ngf_xavier_head_is_seeded_keeps_the_bias_and_uses_the_xavier_range():
    a, b, c = nn.Linear(50, 10), nn.Linear(50, 10), nn.Linear(50, 10)
    bias = a.bias.detach().clone()
    ngf.xavier_head(a, 7), ngf.xavier_head(b, 7), ngf.xavier_head(c, 8)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert torch.equal(a.bias, bias)
    bound = math.sqrt(6 / (50 + 10))
    assert a.weight.abs().max() <= bound and a.weight.abs().max() > 0.9 * bound


def test_ngf_multistep_schedule():
    lr_at = ngf.lr_schedule(make_config("ngf", {"epochs": 20}))  # drops at epochs 7 and 15
    got = [lr_at(e * 100, 100) for e in (0, 6, 7, 14, 15, 19)]
    assert got == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])


# ------------------------------------------------------------------------------------------
# SFT and FT
# ------------------------------------------------------------------------------------------


def test_sft_cycle_runs_on_one_counter_across_the_phase_change():
    # backdoor-toolbox's adjust_lr: pos = iteration mod 2h, the iteration never reset
    params = {"lr_base": 0.1, "lr_max1": 1.1, "lr_max2": 0.6, "half_cycle": 5,
              "phase1_fraction": 0.575}
    cfg = make_config("sft", params)
    # 40 iterations: phase 2 from t = 23, at pos 3 of its cycle (not restarted at 0)
    assert sft.sft_lr(22, 40, cfg) == pytest.approx(0.1 + 1.0 * 2 / 5)
    assert sft.sft_lr(23, 40, cfg) == pytest.approx(0.1 + 0.5 * 3 / 5)
    assert sft.sft_lr(25, 40, cfg) == pytest.approx(0.6)


def test_sft_schedule_at_chosen_steps():
    params = {"lr_base": 0.1, "lr_max1": 1.1, "lr_max2": 0.6, "half_cycle": 5,
              "phase1_fraction": 0.5}
    cfg = make_config("sft", params)
    # 40 iterations: phase 1 is t < 20 (peak 1.1), then peak 0.6 on the same cycle.
    expected = {0: 0.1, 2: 0.5, 5: 1.1, 7: 0.7, 10: 0.1, 15: 1.1, 20: 0.1, 23: 0.4, 25: 0.6,
                30: 0.1, 39: 0.2}
    for t, lr in expected.items():
        assert sft.sft_lr(t, 40, cfg) == pytest.approx(lr), t


def test_vanilla_ft_with_zero_lr_leaves_parameters_unchanged(model, clean):
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    cfg = make_config("ft", {"lr": 0.0, "epochs": 2, "batch_size": 8})
    res = list(ft_mod.run(model, clean, INFO, cfg, seed=0, device=CPU))
    assert len(res) == 2 and res[-1].lr == 0.0
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
    # BN running stats do move in train mode: the check above is about parameters only.
    assert any(not torch.equal(v, buffers[k]) for k, v in model.named_buffers() if "running" in k)


def test_cosine_per_epoch_reaches_zero_at_the_end():
    assert E.cosine_lr(0.01, 0, 10) == 0.01
    assert E.cosine_lr(0.01, 5, 10) == pytest.approx(0.005)
    assert E.cosine_lr(0.01, 10, 10) == pytest.approx(0.0, abs=1e-12)


def test_select_trainable_freezes_backbone_in_eval_mode(model):
    params = E.select_trainable(model, "head")
    assert params == list(model.head.parameters())
    assert not model.body.training and model.head.training
    params = E.select_trainable(model, "backbone")
    assert all(id(p) not in {id(q) for q in model.head.parameters()} for p in params)
    assert model.body.training
    params = E.select_trainable(model, "last_block")
    assert params == [*model.last_block.parameters(), *model.head.parameters()]
    assert model.last_block.training and model.head.training
    assert [m.training for m in model.body] == [m is model.last_block for m in model.body]
