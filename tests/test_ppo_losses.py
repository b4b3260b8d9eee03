"""The PPO pieces for fine-grained rewards, each against numbers derived by hand, plus their properties.

Conventions checked throughout: per-token tensors are (B, L) over response tokens, mask 1 on real
tokens with right padding, and everything outside the mask is 0 in the outputs. Padding positions of
the inputs are filled with garbage (large numbers, NaN) so that a function that forgot the mask
fails the test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmalign.losses import (
    aggregate_segment_rewards,
    combine_type_rewards,
    gae,
    kl_penalty,
    masked_entropy,
    place_segment_rewards,
    place_sequence_reward,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
    whiten,
)

NAN = float("nan")
FEW = settings(max_examples=25, deadline=None)


def approx(t: torch.Tensor, want, rel=1e-6, abs=1e-7):
    """Element-wise ``pytest.approx`` of a tensor against nested lists (shapes must agree)."""
    want = torch.tensor(want, dtype=torch.float64)
    return t.shape == want.shape and t.flatten().tolist() == pytest.approx(want.flatten().tolist(), rel=rel, abs=abs)


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def gae_reference(r: list[float], v: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE on one unpadded row, straight from the definition (sum over l of (gamma lam)^l delta)."""
    n = len(r)
    delta = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
    return [sum((gamma * lam) ** (s - t) * delta[s] for s in range(t, n)) for t in range(n)]


# ---------------------------------------------------------------------------------------------
# reward placement


def test_place_segment_rewards_by_hand():
    """Row 0: segments end on tokens 1 and 3 with 0.5 and -1.0 -> [0, 0.5, 0, -1.0, 0].
    Row 1: two segments end on token 2 (0.25 + 0.5 = 0.75); the third entry is padding (invalid,
    index 99 out of range and value NaN), ignored -> [0, 0, 0.75, 0, 0]."""
    end = torch.tensor([[1, 3, 0], [2, 2, 99]])
    values = torch.tensor([[0.5, -1.0, 0.0], [0.25, 0.5, NAN]])
    valid = torch.tensor([[True, True, False], [True, True, False]])
    out = place_segment_rewards(end, values, valid, length=5)
    assert out.shape == (2, 5)
    assert approx(out, [[0.0, 0.5, 0.0, -1.0, 0.0], [0.0, 0.0, 0.75, 0.0, 0.0]])


def test_place_segment_rewards_invalid_entry_ignored_even_in_range():
    """An invalid entry pointing at a real token with a real value still adds nothing."""
    end = torch.tensor([[0, 1]])
    out = place_segment_rewards(end, torch.tensor([[2.0, 7.0]]), torch.tensor([[True, False]]), length=2)
    assert approx(out, [[2.0, 0.0]])


@pytest.mark.parametrize("bad", [3, -1])
def test_place_segment_rewards_out_of_range_is_error(bad):
    end = torch.tensor([[0, bad]])
    with pytest.raises(ValueError, match="outside"):
        place_segment_rewards(end, torch.tensor([[1.0, 1.0]]), torch.tensor([[True, True]]), length=3)


def test_place_segment_rewards_shape_errors():
    with pytest.raises(ValueError, match="one"):
        place_segment_rewards(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2),
                              torch.ones(2, 3, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="integer"):
        place_segment_rewards(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 4)


@FEW
@given(st.data())
def test_place_segment_rewards_conserves_total(data):
    b = data.draw(st.integers(1, 3))
    s = data.draw(st.integers(0, 5))
    length = data.draw(st.integers(1, 6))
    end = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, length - 1), min_size=s, max_size=s),
                                          min_size=b, max_size=b)), dtype=torch.long).reshape(b, s)
    vals = t64(data.draw(st.lists(st.lists(st.floats(-5, 5), min_size=s, max_size=s),
                                  min_size=b, max_size=b))).reshape(b, s)
    valid = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=s, max_size=s),
                                            min_size=b, max_size=b)), dtype=torch.bool).reshape(b, s)
    out = place_segment_rewards(end, vals, valid, length)
    assert out.shape == (b, length)
    assert torch.allclose(out.sum(1), (vals * valid).sum(1), atol=1e-12)
    # only tokens where some valid segment ends can be non-zero
    ends = torch.zeros(b, length, dtype=torch.bool)
    for i in range(b):
        for j in range(s):
            if valid[i, j]:
                ends[i, end[i, j]] = True
    assert not bool(out[~ends].any())


def test_combine_type_rewards_by_hand():
    """w_o = 1, w_a = 0.5, w_r = 2:
    segment 0: 1 * 1 + 0.5 * (-1) + 2 * 0.5 = 1 - 0.5 + 1 = 1.5
    segment 1: 1 * 0 + 0.5 * 1 + 2 * (-1) = 0.5 - 2 = -1.5
    The weight for 'count' (a type absent from values) is ignored."""
    values = {"object": torch.tensor([[1.0, 0.0]]), "attribute": torch.tensor([[-1.0, 1.0]]),
              "relation": torch.tensor([[0.5, -1.0]])}
    out = combine_type_rewards(values, {"object": 1.0, "attribute": 0.5, "relation": 2.0, "count": 9.0})
    assert approx(out, [[1.5, -1.5]])


def test_combine_type_rewards_errors():
    values = {"object": torch.zeros(1, 2), "relation": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="relation"):
        combine_type_rewards(values, {"object": 1.0})
    with pytest.raises(ValueError, match="shape"):
        combine_type_rewards({"object": torch.zeros(1, 2), "relation": torch.zeros(1, 3)},
                             {"object": 1.0, "relation": 1.0})
    with pytest.raises(ValueError, match="empty"):
        combine_type_rewards({}, {"object": 1.0})


def test_aggregate_segment_rewards_sum_and_mean_by_hand():
    """Row 0: 3 valid segments (+2, -1, +1; padding NaN) -> sum keeps them, mean divides by 3 (total 2/3).
    Row 1: 1 valid segment (-2) -> -2 either way. Row 2: no valid segment -> zeros, not NaN."""
    values = torch.tensor([[2.0, -1.0, 1.0, NAN], [-2.0, 5.0, NAN, NAN], [NAN, 7.0, 1.0, 1.0]])
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert approx(aggregate_segment_rewards(values, valid, "sum"),
                  [[2.0, -1.0, 1.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = aggregate_segment_rewards(values, valid, "mean")
    assert approx(out, [[2 / 3, -1 / 3, 1 / 3, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # length-neutral: three correct segments earn what one does
    three = aggregate_segment_rewards(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), "mean")
    assert three.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        aggregate_segment_rewards(values, valid, "max")
    with pytest.raises(ValueError, match="one \\(B, S\\) shape"):
        aggregate_segment_rewards(values, valid[:, :3], "sum")


def test_place_sequence_reward_on_last_real_token():
    """Row 0 has 3 tokens -> reward 2.0 at index 2; row 1 has 1 token -> -1.0 at index 0."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    out = place_sequence_reward(torch.tensor([2.0, -1.0]), mask)
    assert approx(out, [[0.0, 0.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])


def test_place_sequence_reward_empty_row_is_error():
    mask = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match=r"\[1\]"):
        place_sequence_reward(torch.tensor([1.0, 1.0]), mask)


# ---------------------------------------------------------------------------------------------
# KL and token rewards


def test_kl_estimators_by_hand():
    """d = logp - ref.
    token 0: logp -1, ref -2 -> d = 1:  k1 1, abs 1, mse 0.5,
             k3: r = exp(-1) = 0.367879, (r - 1) - log r = 0.367879 - 1 + 1 = 0.367879
    token 1: logp -2, ref -1 -> d = -1: k1 -1, abs 1, mse 0.5,
             k3: r = e = 2.718282, (r - 1) - 1 = 0.718282
    token 2: equal -> 0 for all."""
    logp = t64([[-1.0, -2.0, -0.3]])
    ref = t64([[-2.0, -1.0, -0.3]])
    assert approx(kl_penalty(logp, ref, "k1"), [[1.0, -1.0, 0.0]])
    assert approx(kl_penalty(logp, ref, "abs"), [[1.0, 1.0, 0.0]])
    assert approx(kl_penalty(logp, ref, "mse"), [[0.5, 0.5, 0.0]])
    assert approx(kl_penalty(logp, ref, "k3"), [[0.367879, 0.718282, 0.0]], rel=1e-5)
    assert approx(kl_penalty(logp, ref), [[1.0, -1.0, 0.0]])          # default k1


def test_kl_unknown_kind_and_shapes():
    with pytest.raises(ValueError, match="unknown"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "k2")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 3))


@FEW
@given(st.lists(st.tuples(st.floats(-30, 0), st.floats(-30, 0)), min_size=1, max_size=8))
def test_k3_nonnegative(pairs):
    logp = t64([[p for p, _ in pairs]])
    ref = t64([[q for _, q in pairs]])
    k3 = kl_penalty(logp, ref, "k3")
    assert bool((k3 >= 0).all())
    # and it agrees with the textbook form where that is well conditioned
    r = torch.exp(ref - logp)
    assert torch.allclose(k3, (r - 1) - torch.log(r), rtol=1e-9, atol=1e-9)


def test_token_rewards_by_hand():
    """kl_coef 0.1, k1. Row 0 (4 tokens): placed [0, 0.5, 0, 1.0], d = logp - ref = [0.2, -0.4, 0, 1.0]
        r = [0 - 0.02, 0.5 + 0.04, 0 - 0, 1.0 - 0.1] = [-0.02, 0.54, 0.0, 0.9]
    Row 1 (2 tokens, then padding with garbage): placed [0, 2.0], d = [0.5, 0.5]
        r = [-0.05, 1.95, 0, 0]; kl = [0.5, 0.5, 0, 0]."""
    placed = t64([[0.0, 0.5, 0.0, 1.0], [0.0, 2.0, 50.0, NAN]])
    logp = t64([[-1.0, -1.4, -0.5, -0.5], [-0.5, -0.5, 9.0, NAN]])
    ref = t64([[-1.2, -1.0, -0.5, -1.5], [-1.0, -1.0, -9.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    rewards, kl = token_rewards(placed, logp, ref, mask, kl_coef=0.1)
    assert approx(rewards, [[-0.02, 0.54, 0.0, 0.9], [-0.05, 1.95, 0.0, 0.0]], rel=1e-9, abs=1e-12)
    assert approx(kl, [[0.2, -0.4, 0.0, 1.0], [0.5, 0.5, 0.0, 0.0]], rel=1e-9, abs=1e-12)
    # beta = 0 leaves the task rewards alone
    r0, _ = token_rewards(placed, logp, ref, mask, kl_coef=0.0)
    assert approx(r0, [[0.0, 0.5, 0.0, 1.0], [0.0, 2.0, 0.0, 0.0]])


def test_token_rewards_detached_and_checked():
    logp = torch.zeros(1, 2, requires_grad=True)
    rewards, kl = token_rewards(torch.ones(1, 2), logp, torch.zeros(1, 2), torch.ones(1, 2), kl_coef=0.1)
    assert not rewards.requires_grad and not kl.requires_grad
    with pytest.raises(ValueError, match="kl_coef"):
        token_rewards(torch.ones(1, 2), logp, torch.zeros(1, 2), torch.ones(1, 2), kl_coef=-1.0)
    with pytest.raises(ValueError, match="0 and 1"):
        token_rewards(torch.ones(1, 2), logp, torch.zeros(1, 2), torch.tensor([[1.0, 0.5]]), kl_coef=0.1)


# ---------------------------------------------------------------------------------------------
# GAE


def test_gae_by_hand():
    """r = [0.5, 0, 1], V = [0.5, 0.6, 0.7], gamma 0.9, lam 0.8 (gamma lam = 0.72).
    delta_2 = 1 + 0.9 * 0 - 0.7            = 0.3        A_2 = 0.3
    delta_1 = 0 + 0.9 * 0.7 - 0.6 = 0.03                A_1 = 0.03 + 0.72 * 0.3   = 0.246
    delta_0 = 0.5 + 0.9 * 0.6 - 0.5 = 0.54              A_0 = 0.54 + 0.72 * 0.246 = 0.54 + 0.17712 = 0.71712
    returns = A + V = [1.21712, 0.846, 1.0]."""
    adv, ret = gae(t64([[0.5, 0.0, 1.0]]), t64([[0.5, 0.6, 0.7]]), torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert approx(adv, [[0.71712, 0.246, 0.3]], rel=1e-12)
    assert approx(ret, [[1.21712, 0.846, 1.0]], rel=1e-12)


def test_gae_padded_row_equals_its_prefix_alone():
    """Row 1 is 2 tokens long; its padding holds garbage rewards (NaN) and values (100). Its result
    must equal GAE on the 2-token row alone, and be 0 on padding. Row 0 (full length) is unaffected
    by row 1."""
    rewards = t64([[0.1, -0.2, 0.3, 1.0], [0.5, 1.0, NAN, 7.0]])
    values = t64([[0.2, 0.4, 0.1, -0.3], [0.3, 0.6, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    adv1, ret1 = gae(rewards[1:, :2], values[1:, :2], torch.ones(1, 2), gamma=0.99, lam=0.95)
    adv0, ret0 = gae(rewards[:1], values[:1], torch.ones(1, 4), gamma=0.99, lam=0.95)
    assert torch.equal(adv[1, :2], adv1[0]) and torch.equal(ret[1, :2], ret1[0])
    assert adv[1, 2:].tolist() == [0.0, 0.0] and ret[1, 2:].tolist() == [0.0, 0.0]
    assert torch.equal(adv[0], adv0[0]) and torch.equal(ret[0], ret0[0])
    # and the prefix itself by hand: delta_1 = 1 - 0.6 = 0.4; delta_0 = 0.5 + 0.99 * 0.6 - 0.3 = 0.794
    # A_1 = 0.4, A_0 = 0.794 + 0.99 * 0.95 * 0.4 = 0.794 + 0.3762 = 1.1702
    assert approx(adv1, [[1.1702, 0.4]], rel=1e-12)


@FEW
@given(st.data())
def test_gae_gamma_lam_one_is_reward_to_go_minus_value(data):
    n = data.draw(st.integers(1, 6))
    pad = data.draw(st.integers(0, 3))
    r = data.draw(st.lists(st.floats(-3, 3), min_size=n, max_size=n))
    v = data.draw(st.lists(st.floats(-3, 3), min_size=n, max_size=n))
    rewards = t64([r + [5.0] * pad])
    values = t64([v + [-5.0] * pad])
    mask = torch.tensor([[True] * n + [False] * pad])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    want = [sum(r[t:]) - v[t] for t in range(n)] + [0.0] * pad
    assert approx(adv, [want], rel=1e-9, abs=1e-9)
    assert approx(ret, [[sum(r[t:]) for t in range(n)] + [0.0] * pad], rel=1e-9, abs=1e-9)


@FEW
@given(st.data())
def test_gae_matches_textbook_sum(data):
    n = data.draw(st.integers(1, 6))
    gamma = data.draw(st.floats(0.0, 1.0))
    lam = data.draw(st.floats(0.0, 1.0))
    r = data.draw(st.lists(st.floats(-3, 3), min_size=n, max_size=n))
    v = data.draw(st.lists(st.floats(-3, 3), min_size=n, max_size=n))
    adv, _ = gae(t64([r]), t64([v]), torch.ones(1, n), gamma=gamma, lam=lam)
    assert approx(adv, [gae_reference(r, v, gamma, lam)], rel=1e-9, abs=1e-9)


def test_gae_no_grad_and_checks():
    values = torch.ones(1, 3, requires_grad=True)
    adv, ret = gae(torch.ones(1, 3), values, torch.ones(1, 3))
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.ones(1, 3), torch.ones(1, 3), torch.tensor([[1.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.ones(1, 3), torch.ones(1, 3), torch.ones(1, 3), gamma=1.5)
    with pytest.raises(ValueError, match="shape"):
        gae(torch.ones(1, 3), torch.ones(1, 3), torch.ones(1, 4))


# ---------------------------------------------------------------------------------------------
# whitening


def test_whiten_by_hand_unbiased():
    """Masked entries [1, 2, 3] (padding 40, NaN): mean 2, unbiased var ((1 + 0 + 1) / 2) = 1
    -> [-1, 0, 1] (the biased var 2/3 would give +-1.224745). shift_mean=False adds the mean back:
    [1, 2, 3]. Masked entries [0, 4] in a second call: mean 2, unbiased var (4 + 4) / 1 = 8,
    std 2.828427 -> [-0.707107, 0.707107]; keeping the mean -> [1.292893, 2.707107]."""
    x = t64([[1.0, 2.0, 40.0], [3.0, NAN, 40.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    assert approx(whiten(x, mask), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], rel=1e-7, abs=1e-7)
    assert approx(whiten(x, mask, shift_mean=False), [[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], rel=1e-7, abs=1e-7)
    y = t64([[0.0, 4.0]])
    assert approx(whiten(y, torch.ones(1, 2)), [[-0.707107, 0.707107]], rel=1e-6)
    assert approx(whiten(y, torch.ones(1, 2), shift_mean=False), [[1.292893, 2.707107]], rel=1e-6)


@FEW
@given(st.lists(st.floats(-100, 100), min_size=3, max_size=12).filter(lambda xs: max(xs) - min(xs) > 1e-2))
def test_whiten_zero_mean_unit_std_on_masked(xs):
    n = len(xs)
    x = t64([xs + [1e6, -1e6]])
    mask = torch.tensor([[True] * n + [False, False]])
    out = whiten(x, mask)
    real = out[0, :n]
    assert abs(real.mean().item()) < 1e-6
    # (x - mean) / sqrt(var + eps): the std is sqrt(var / (var + eps)), 1 up to eps's share
    var = torch.tensor(xs, dtype=torch.float64).var(unbiased=True).item()
    assert real.std(unbiased=True).item() == pytest.approx(math.sqrt(var / (var + 1e-8)), rel=1e-9)
    assert out[0, n:].tolist() == [0.0, 0.0]
    kept = whiten(x, mask, shift_mean=False)[0, :n]
    assert kept.mean().item() == pytest.approx(sum(xs) / n, rel=1e-6, abs=1e-6)


def test_whiten_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2"):
        whiten(torch.ones(1, 3), torch.tensor([[1, 0, 0]]))


# ---------------------------------------------------------------------------------------------
# policy loss


def test_policy_loss_by_hand():
    """eps = 0.2; three real tokens and one padding token (garbage log-probs 80 / NaN advantage).
    token 0: rho = 1.5, A = 2:  -A rho = -3.0, -A clip = -2 * 1.2 = -2.4 -> max -2.4 (clipped)
    token 1: rho = 0.5, A = 1:  -A rho = -0.5, -A clip = -1 * 0.8 = -0.8 -> max -0.5 (unclipped)
    token 2: rho = 0.5, A = -1: -A rho =  0.5, -A clip =  0.8         -> max  0.8 (clipped)
    loss = (-2.4 - 0.5 + 0.8) / 3 = -2.1 / 3 = -0.7; clip_fraction = 2/3
    ratio_mean = (1.5 + 0.5 + 0.5) / 3 = 0.833333
    approx_kl = 0.5 * (log(1.5)^2 + 2 log(0.5)^2) / 3 = 0.5 * (0.164402 + 2 * 0.480453) / 3 = 0.187551"""
    old = t64([[-1.0, -1.0, -2.0, 0.0]])
    logp = old + t64([[math.log(1.5), math.log(0.5), math.log(0.5), 80.0]])
    adv = t64([[2.0, 1.0, -1.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.float32)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.7, rel=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    assert stats["ratio_mean"].item() == pytest.approx(2.5 / 3, rel=1e-12)
    assert stats["approx_kl"].item() == pytest.approx(0.187551, rel=1e-5)
    assert set(stats) == {"clip_fraction", "approx_kl", "ratio_mean"}
    assert all(not v.requires_grad and v.shape == () for v in stats.values())


@FEW
@given(st.data())
def test_policy_loss_inside_clip_region_is_unclipped(data):
    eps = data.draw(st.floats(0.05, 0.5))
    n = data.draw(st.integers(1, 6))
    # log-ratios strictly inside [log(1 - eps), log(1 + eps)]
    lo, hi = math.log(1 - eps) * 0.99, math.log(1 + eps) * 0.99
    lr = data.draw(st.lists(st.floats(lo, hi), min_size=n, max_size=n))
    a = data.draw(st.lists(st.floats(-5, 5), min_size=n, max_size=n))
    old = t64([[-1.0] * n])
    logp = old + t64([lr])
    adv = t64([a])
    loss, stats = ppo_policy_loss(logp, old, adv, torch.ones(1, n), clip_range=eps)
    want = sum(-ai * math.exp(li) for ai, li in zip(a, lr, strict=True)) / n
    assert loss.item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert stats["clip_fraction"].item() == 0.0


def test_policy_loss_gradient_zero_where_clipped():
    """eps 0.2. Token 0: A = 1, rho = 1.5 > 1.2 -> clipped, grad 0. Token 1: A = -1, rho = 0.5 < 0.8 ->
    clipped, grad 0. Token 2: A = 1, rho = 0.5 (below the region but the pessimistic term is the
    unclipped one) -> d/dlogp of -A rho / 3 = -rho / 3 = -1/6. Token 3 is padding: grad 0."""
    old = t64([[0.0, 0.0, 0.0, 0.0]])
    logp = t64([[math.log(1.5), math.log(0.5), math.log(0.5), 30.0]]).requires_grad_(True)
    adv = t64([[1.0, -1.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    loss.backward()
    assert approx(logp.grad, [[0.0, 0.0, -1 / 6, 0.0]], rel=1e-12)


def test_policy_loss_detaches_rollout_and_checks():
    old = torch.zeros(1, 2, requires_grad=True)
    adv = torch.ones(1, 2, requires_grad=True)
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = ppo_policy_loss(logp, old, adv, torch.ones(1, 2))
    loss.backward()
    assert old.grad is None and adv.grad is None and logp.grad is not None
    with pytest.raises(ValueError, match="clip_range"):
        ppo_policy_loss(logp, old, adv, torch.ones(1, 2), clip_range=0.0)
    with pytest.raises(ValueError, match="mask"):
        ppo_policy_loss(logp, old, adv, torch.ones(2, 2))


# ---------------------------------------------------------------------------------------------
# value loss


def test_value_loss_by_hand():
    """c = 0.2; two real tokens and padding (garbage 1e3).
    token 0: V 1.0, old 0.5, R 2.0: V - old = 0.5 -> clamp 0.2 -> V_clip 0.7
             (V - R)^2 = 1.0, (V_clip - R)^2 = 1.69 -> 1.69 (clipped)
    token 1: V 2.0, old 2.5, R 3.0: V - old = -0.5 -> V_clip 2.3
             (V - R)^2 = 1.0, (V_clip - R)^2 = 0.49 -> 1.0 (unclipped)
    clipped:   0.5 * (1.69 + 1.0) / 2 = 0.6725, value_clip_fraction 0.5
    unclipped: 0.5 * (1.0 + 1.0) / 2 = 0.5, value_clip_fraction 0
    explained variance: R - V = [1, 1] has variance 0, Var(R) = 0.25 -> 1.0."""
    values = t64([[1.0, 2.0, 1e3]]).requires_grad_(True)
    old = t64([[0.5, 2.5, -1e3]])
    ret = t64([[2.0, 3.0, 1e3]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.float32)
    loss, stats = ppo_value_loss(values, old, ret, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.6725, rel=1e-12)
    assert stats["value_clip_fraction"].item() == 0.5
    assert stats["explained_variance"].item() == pytest.approx(1.0)
    # token 0 took the clipped branch with V beyond old + c: no gradient there. Token 1:
    # d/dV of 0.5 * (V - R)^2 / 2 = (V - R) / 2 = -0.5. Padding: 0.
    loss.backward()
    assert approx(values.grad, [[0.0, -0.5, 0.0]], rel=1e-12)
    loss_u, stats_u = ppo_value_loss(values.detach(), old, ret, mask, clip_range_value=None)
    assert loss_u.item() == pytest.approx(0.5, rel=1e-12)
    assert stats_u["value_clip_fraction"].item() == 0.0


def test_value_loss_explained_variance():
    """R = [0, 1, 2] (population var 2/3).
    V = R      -> residual 0            -> EV 1
    V = 2 R    -> residual -R, var 2/3  -> EV 0
    V = R / 2  -> residual R/2, var 1/6 -> EV 1 - (1/6) / (2/3) = 0.75
    constant R -> NaN."""
    r = t64([[0.0, 1.0, 2.0]])
    m = torch.ones(1, 3)
    ev = [ppo_value_loss(v, v, r, m)[1]["explained_variance"].item() for v in (r, 2 * r, r / 2)]
    assert ev == pytest.approx([1.0, 0.0, 0.75], abs=1e-12)
    assert math.isnan(ppo_value_loss(r, r, torch.ones(1, 3), m)[1]["explained_variance"].item())


def test_value_loss_checks():
    with pytest.raises(ValueError, match="clip_range_value"):
        ppo_value_loss(torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip_range_value=-1)
    with pytest.raises(ValueError, match="shape"):
        ppo_value_loss(torch.ones(1, 2), torch.ones(1, 3), torch.ones(1, 2), torch.ones(1, 2))


# ---------------------------------------------------------------------------------------------
# entropy


def test_masked_entropy_uniform_is_log_v():
    """Uniform logits over V = 7 -> H = log 7 on every real token; the padded position has peaked
    logits (H near 0) and must not pull the mean down."""
    logits = torch.zeros(2, 3, 7)
    logits[1, 2, 0] = 50.0
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert masked_entropy(logits, mask).item() == pytest.approx(math.log(7), rel=1e-6)


def test_masked_entropy_by_hand_and_neg_inf():
    """p = [0.5, 0.25, 0.25]: H = 0.5 ln 2 + 2 * 0.25 ln 4 = 0.5 ln 2 + ln 2 = 1.5 ln 2 = 1.039721.
    Second token: logits [0, -inf, -inf, 0] -> two equal outcomes, H = ln 2 = 0.693147, and the
    gradient stays finite. Mean: (1.5 + 1) ln 2 / 2 = 1.25 ln 2 = 0.866434."""
    ninf = float("-inf")
    logits = torch.tensor([[[math.log(0.5), math.log(0.25), math.log(0.25), ninf],
                            [0.0, ninf, ninf, 0.0]]], dtype=torch.float64, requires_grad=True)
    h = masked_entropy(logits, torch.ones(1, 2))
    assert h.item() == pytest.approx(1.25 * math.log(2), rel=1e-12)
    h.backward()
    assert bool(torch.isfinite(logits.grad).all())


def test_masked_entropy_shape_check():
    with pytest.raises(ValueError, match="logits"):
        masked_entropy(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        masked_entropy(torch.zeros(2, 3, 4), torch.ones(2, 4))


def test_gae_defaults_are_the_releases_gamma_lam_one():
    # gamma = lam = 1 (the released FGAIF / Fine-Grained RLHF values): A_t = sum_{s>=t} r_s - V_t.
    # rewards [1, 0, 2] -> returns-to-go [3, 2, 2]; values [0.5, 1, 0.5] -> A = [2.5, 1, 1.5]
    adv, ret = gae(t64([[1.0, 0.0, 2.0]]), t64([[0.5, 1.0, 0.5]]), torch.ones(1, 3))
    assert torch.allclose(adv, t64([[2.5, 1.0, 1.5]])) and torch.allclose(ret, t64([[3.0, 2.0, 2.0]]))
