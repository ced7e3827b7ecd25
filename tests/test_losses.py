"""Preference, KTO, reward and PPO losses vs their papers' equations written out here (float64, random
inputs, relative diff <= 1e-6) and small cases worked out by hand."""

import math

import pytest
import torch

from llmtune.errors import LLMTuneError
from llmtune.losses import (
    AdaptiveKLController,
    FixedKLController,
    dpo_loss,
    gae_advantages,
    kl_penalty_rewards,
    kto_loss,
    orpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reward_loss,
    simpo_loss,
    value_head_scores,
    whiten,
)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _close(a, b, rel=1e-6):
    return abs(a - b) <= rel * max(abs(b), 1e-12)


def _logps(n=8):
    # realistic sequence log-probs (negative, tens of nats)
    return [-(torch.rand(n, dtype=torch.float64) * 40 + 1) for _ in range(4)]


# ---------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_paper_equations(loss_type, beta):
    pc, pr, rc, rr = _logps()
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type)
    for i in range(len(pc)):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        if loss_type == "sigmoid":  # Rafailov et al. 2023 eq. 7
            ref = -_log_sigmoid(beta * h)
        elif loss_type == "hinge":  # SLiC
            ref = max(0.0, 1.0 - beta * h)
        else:  # IPO, Azar et al. 2023 eq. 17
            ref = (h - 1.0 / (2.0 * beta)) ** 2
        assert _close(float(losses[i]), ref)
        assert _close(float(cr[i]), beta * (float(pc[i]) - float(rc[i])))
        assert _close(float(rj[i]), beta * (float(pr[i]) - float(rr[i])))
    assert not cr.requires_grad and losses.shape == pc.shape


def test_dpo_label_smoothing_conservative():
    pc, pr, rc, rr = _logps()
    eps, beta = 0.2, 0.3
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    for i in range(len(pc)):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        ref = -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
        assert _close(float(losses[i]), ref)


def test_dpo_kto_pair_matches_trl_definition():
    pc, pr, rc, rr = _logps()
    beta = 0.2
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type="kto_pair")
    rw = [float(a - b) for a, b in zip(pc, rc)]
    rl = [float(a - b) for a, b in zip(pr, rr)]
    zw = max(0.0, sum(rw) / len(rw))
    zl = max(0.0, sum(rl) / len(rl))
    # TRL: 2B terms, chosen against the rejected-half KL and vice versa; mean over 2B
    terms = [1 - _sigmoid(beta * (x - zl)) for x in rw] + [1 - _sigmoid(beta * (zw - x)) for x in rl]
    assert _close(float(losses.mean()), sum(terms) / len(terms))
    for i in range(len(rw)):
        assert _close(float(losses[i]), 0.5 * (terms[i] + terms[len(rw) + i]))


def test_dpo_hand_case():
    # h = (-1 - -1.5) - (-2 - -1.5) = 0.5 + 0.5 = 1.0
    args = [torch.tensor([x], dtype=torch.float64) for x in (-1.0, -2.0, -1.5, -1.5)]
    loss, cr, rj = dpo_loss(*args, beta=0.1)
    assert abs(float(loss) - 0.6443966600735709) < 1e-12  # ln(1 + e^-0.1)
    assert abs(float(cr) - 0.05) < 1e-12 and abs(float(rj) + 0.05) < 1e-12
    loss, _, _ = dpo_loss(*args, beta=0.1, loss_type="hinge")
    assert abs(float(loss) - 0.9) < 1e-12  # relu(1 - 0.1)
    loss, _, _ = dpo_loss(*args, beta=0.1, loss_type="ipo")
    assert abs(float(loss) - 16.0) < 1e-12  # (1 - 1/0.2)^2 = (-4)^2


def test_dpo_sigmoid_gradient_closed_form():
    pc, pr, rc, rr = _logps()
    pc.requires_grad_()
    pr.requires_grad_()
    beta, eps = 0.25, 0.1
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    losses.sum().backward()
    h = (pc - rc) - (pr - rr)
    # d/d pc [-(1-eps) log s(beta h) - eps log s(-beta h)] = -(1-eps) beta s(-beta h) + eps beta s(beta h)
    d = (-(1 - eps) * beta * torch.sigmoid(-beta * h) + eps * beta * torch.sigmoid(beta * h)).detach()
    assert torch.allclose(pc.grad, d, rtol=1e-10)
    assert torch.allclose(pr.grad, -d, rtol=1e-10)


def test_dpo_bad_loss_type_and_beta():
    x = torch.zeros(2)
    with pytest.raises(LLMTuneError) as e:
        dpo_loss(x, x, x, x, 0.1, loss_type="sigmod")
    msg = str(e.value)
    assert "sigmod" in msg and all(t in msg for t in ("sigmoid", "hinge", "ipo", "kto_pair"))
    with pytest.raises(LLMTuneError, match="pref_beta"):
        dpo_loss(x, x, x, x, 0.0, loss_type="ipo")


# ---------------------------------------------------------------------------- ORPO / SimPO
def test_orpo_matches_paper():
    ac = -torch.rand(8, dtype=torch.float64) * 3 - 0.01  # averaged log-probs
    ar = -torch.rand(8, dtype=torch.float64) * 3 - 0.01
    beta = 0.1
    losses, cr, rj = orpo_loss(ac, ar, beta)
    for i in range(8):
        pw, pl = math.exp(float(ac[i])), math.exp(float(ar[i]))
        log_or = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))  # Hong et al. 2024 eq. 6
        assert _close(float(losses[i]), -beta * _log_sigmoid(log_or))
        assert _close(float(cr[i]), beta * float(ac[i]))


def test_orpo_hand_case():
    # P(y_w) = 0.5 -> odds 1; P(y_l) = 0.2 -> odds 0.25; log OR = ln 4; -log s(ln 4) = ln(1.25)
    losses, _, _ = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), beta=0.1)
    assert abs(float(losses) - 0.1 * math.log(1.25)) < 1e-7


def test_simpo_matches_paper_and_hand_case():
    ac = -torch.rand(8, dtype=torch.float64) * 3
    ar = -torch.rand(8, dtype=torch.float64) * 3
    beta, gamma = 2.0, 0.8
    losses, cr, rj = simpo_loss(ac, ar, beta, gamma)
    for i in range(8):  # Meng et al. 2024 eq. 6
        assert _close(float(losses[i]), -_log_sigmoid(beta * float(ac[i]) - beta * float(ar[i]) - gamma))
        assert _close(float(rj[i]), beta * float(ar[i]))
    # beta=2, gamma=0.5, avg_w=-1, avg_l=-1.5: 2*0.5 - 0.5 = 0.5 -> ln(1 + e^-0.5)
    loss, _, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), 2.0, 0.5)
    assert abs(float(loss) - 0.47407698418010663) < 1e-7


# ---------------------------------------------------------------------------- KTO
def test_kto_matches_equation_in_input_order():
    n = 10
    pol = -torch.rand(n, dtype=torch.float64) * 30
    ref = -torch.rand(n, dtype=torch.float64) * 30
    pkl = -torch.rand(n, dtype=torch.float64) * 30
    rkl = pkl - torch.rand(n, dtype=torch.float64)  # policy above ref on average: z0 > 0
    des = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    beta, wd, wu = 0.1, 1.0, 1.33
    losses, rewards, kl = kto_loss(pol, ref, pkl, rkl, des, beta, wd, wu)
    z0 = max(0.0, sum(float(a - b) for a, b in zip(pkl, rkl)) / n)
    assert z0 > 0 and _close(float(kl), z0)
    for i in range(n):
        r = float(pol[i] - ref[i])
        if des[i]:
            exp = wd * (1 - _sigmoid(beta * (r - z0)))
        else:
            exp = wu * (1 - _sigmoid(beta * (z0 - r)))
        assert _close(float(losses[i]), exp)
        assert _close(float(rewards[i]), beta * r)


def test_kto_reference_point_has_no_gradient_and_clamps():
    pol = torch.tensor([-5.0, -7.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-6.0, -6.0], dtype=torch.float64)
    pkl = torch.tensor([-9.0, -9.0], dtype=torch.float64, requires_grad=True)
    rkl = torch.tensor([-8.0, -8.0], dtype=torch.float64)  # mean KL = -1 -> clamped to 0
    losses, _, kl = kto_loss(pol, ref, pkl, rkl, torch.tensor([True, False]), beta=1.0)
    losses.sum().backward()
    assert float(kl) == 0.0
    assert pkl.grad is None or torch.all(pkl.grad == 0)
    # hand case with z0 = 0, beta = 1: r = (1, -1); desirable 1 - s(1); undesirable 1 - s(0 - (-1)) = 1 - s(1)
    assert abs(float(losses[0].detach()) - (1 - _sigmoid(1.0))) < 1e-12
    assert abs(float(losses[1].detach()) - (1 - _sigmoid(1.0))) < 1e-12
    # d/dr of 1 - s(r) = -s(1)(1-s(1)); undesirable: +s(1)(1-s(1))
    s = _sigmoid(1.0)
    assert torch.allclose(pol.grad, torch.tensor([-s * (1 - s), s * (1 - s)], dtype=torch.float64))


def test_kto_kl_override():
    pol, ref = torch.tensor([-2.0]), torch.tensor([-3.0])
    junk = torch.tensor([100.0])
    losses, _, kl = kto_loss(pol, ref, junk, -junk, torch.tensor([True]), beta=0.5, kl=torch.tensor(0.4))
    assert abs(float(kl) - 0.4) < 1e-7
    assert abs(float(losses) - (1 - _sigmoid(0.5 * (1.0 - 0.4)))) < 1e-6


# ---------------------------------------------------------------------------- reward model
def test_reward_loss():
    c = torch.randn(6, dtype=torch.float64)
    r = torch.randn(6, dtype=torch.float64)
    out = reward_loss(c, r)
    for i in range(6):
        assert _close(float(out[i]), math.log1p(math.exp(-(float(c[i]) - float(r[i])))))
    assert abs(float(reward_loss(torch.tensor([2.0]), torch.tensor([1.0]))) - 0.31326168751822286) < 1e-7


def test_value_head_scores_left_and_right_padding():
    values = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    assert value_head_scores(values, right).tolist() == [3.0, 11.0]
    assert value_head_scores(values, left).tolist() == [5.0, 10.0]
    assert value_head_scores(values[..., None], right).tolist() == [3.0, 11.0]


# ---------------------------------------------------------------------------- PPO
def test_gae_vs_hand_loop_different_lengths():
    lengths = [5, 2, 7, 1]
    T, gamma, lam = 7, 0.97, 0.9
    rewards = torch.randn(4, T, dtype=torch.float64)
    values = torch.randn(4, T, dtype=torch.float64)  # garbage in padding on purpose
    mask = torch.zeros(4, T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist()
        a = [0.0] * n
        running = 0.0
        for t in reversed(range(n)):  # episode ends after token n-1: V(terminal) = 0
            nv = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * nv - v[t] + gamma * lam * running
            a[t] = running
        for t in range(n):
            assert _close(float(adv[b, t]), a[t], rel=1e-9)
            assert _close(float(ret[b, t]), a[t] + v[t], rel=1e-9)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)


def test_gae_hand_case():
    # two tokens, gamma = lam = 1, r = (0, 1), V = (0.5, 0.25), V after the end = 0:
    # delta_1 = 1 + 0 - 0.25 = 0.75; delta_0 = 0 + 0.25 - 0.5 = -0.25; A = (-0.25 + 0.75, 0.75) = (0.5, 0.75)
    adv, ret = gae_advantages(torch.tensor([[0.0, 1.0, 9.0]]), torch.tensor([[0.5, 0.25, 9.0]]),
                              torch.tensor([[1, 1, 0]]), 1.0, 1.0)
    assert adv.tolist() == [[0.5, 0.75, 0.0]]
    assert ret.tolist() == [[1.0, 1.0, 0.0]]  # A + V


def test_whiten():
    x = torch.randn(3, 6, dtype=torch.float64) * 4 + 2
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    vals = x[mask]
    mean, var = vals.mean(), vals.var(unbiased=True)
    out = whiten(x, mask)
    assert torch.allclose(out[mask], (vals - mean) / torch.sqrt(var + 1e-8), rtol=1e-10)
    assert torch.all(out[~mask] == 0)
    out2 = whiten(x, mask, shift_mean=False)
    assert torch.allclose(out2[mask], (vals - mean) / torch.sqrt(var + 1e-8) + mean, rtol=1e-10)


def test_ppo_policy_loss_hand_case():
    # token 1: ratio e^0.5=1.6487, A=+1 -> max(-1.6487, -1.2) = -1.2 (clipped)
    # token 2: ratio e^-0.5=0.6065, A=+1 -> max(-0.6065, -0.8) = -0.6065 (unclipped)
    # token 3: ratio e^-0.5, A=-2 -> max(1.2131, 1.6) = 1.6 (clipped); token 4 masked
    logps = torch.tensor([[0.5, -0.5, -0.5, 3.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 4, dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = ppo_policy_loss(logps, old, adv, mask, 0.2)
    expected = (-1.2 - math.exp(-0.5) + 1.6) / 3
    assert abs(float(loss.detach()) - expected) < 1e-12
    assert abs(float(clipfrac) - 2 / 3) < 1e-12
    loss.backward()
    # only the unclipped token has a gradient: d(-A e^{dl})/d l = -A ratio / 3
    assert torch.allclose(logps.grad, torch.tensor([[0.0, -math.exp(-0.5) / 3, 0.0, 0.0]], dtype=torch.float64))


def test_ppo_policy_loss_random_vs_equation():
    logps = torch.randn(3, 5, dtype=torch.float64) * 0.3
    old = torch.randn(3, 5, dtype=torch.float64) * 0.3
    adv = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.rand(3, 5) > 0.3
    loss, _ = ppo_policy_loss(logps, old, adv, mask, 0.1)
    terms = []
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                ratio = math.exp(float(logps[b, t] - old[b, t]))
                a = float(adv[b, t])
                terms.append(max(-a * ratio, -a * min(max(ratio, 0.9), 1.1)))
    assert _close(float(loss), sum(terms) / len(terms))


def test_ppo_value_loss_hand_case():
    # v=1.0, old=0.0, R=2.0, c=0.2: clip(v)=0.2; max((1-2)^2, (0.2-2)^2) = 3.24
    # v=0.1, old=0.0, R=-1.0: unclipped 1.21, clipped same 1.21
    # v=3.0, old=2.9, R=3.0: 0 vs (3.0-3.0)^2=0 -> 0 ; third masked out below
    values = torch.tensor([[1.0, 0.1, 3.0, 7.0]], dtype=torch.float64)
    old = torch.tensor([[0.0, 0.0, 2.9, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[2.0, -1.0, 3.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss = ppo_value_loss(values, old, ret, mask, 0.2)
    assert abs(float(loss) - 0.5 * (3.24 + 1.21 + 0.0) / 3) < 1e-12


def test_kl_penalty_rewards_placement():
    scores = torch.tensor([10.0, 20.0, 30.0])
    logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0]] * 3)
    ref = torch.tensor([[-1.5, -1.0, -3.0, -9.0]] * 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
    rewards, kl = kl_penalty_rewards(scores, logps, ref, mask, kl_coef=0.1)
    # kl = logp - ref = (0.5, -1.0, 0.0, 5.0) masked; rewards = -0.1 kl, + score at the last valid token
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.5, -1.0, 0.0, 5.0], [0.0, -1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([
        [-0.05, 0.1, 10.0, 0.0],
        [-0.05, 0.1, 0.0, 19.5],
        [0.0, 0.1, 30.0, 0.0],
    ]))


def test_kl_controllers():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    c.update(9.0, n_steps=100)  # e = clip(0.5, +-0.2) = 0.2 -> x(1 + 0.2 * 100 / 10000)
    assert abs(c.value - 0.2 * 1.002) < 1e-12
    c.update(5.4, n_steps=1000)  # e = -0.1 -> x(1 - 0.01)
    assert abs(c.value - 0.2 * 1.002 * 0.99) < 1e-12
    f = FixedKLController(0.05)
    f.update(100.0, 10)
    assert f.value == 0.05
