"""The pairwise preference losses, derived by hand on a two-pair batch, plus their properties.

Two pairs of summed completion log-probs:

            policy chosen  ref chosen  policy rejected  ref rejected
    pair 0:     -1.0         -2.0          -3.0            -2.5
    pair 1:     -4.0         -3.0          -2.0            -3.0

chosen log-ratios   pc - rc = [-1 - (-2), -4 - (-3)] = [ 1.0, -1.0]
rejected log-ratios pr - rr = [-3 - (-2.5), -2 - (-3)] = [-0.5,  1.0]
h = chosen - rejected       = [1.0 - (-0.5), -1.0 - 1.0] = [1.5, -2.0]

Pair 0 is "learned" (the policy already prefers the chosen one more than the reference does),
pair 1 is "anti-learned". Throughout, softplus(x) = log(1 + e^x) and -log sigma(x) = softplus(-x).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmalign.losses import (
    DPOOutput,
    all_pairs,
    dpo_sigmoid_loss,
    dynamic_beta,
    ipo_loss,
    nll_anchored_dpo_loss,
)

PC = torch.tensor([-1.0, -4.0])
RC = torch.tensor([-2.0, -3.0])
PR = torch.tensor([-3.0, -2.0])
RR = torch.tensor([-2.5, -3.0])
BATCH = (PC, PR, RC, RR)        # the functions' argument order: policy c, policy r, ref c, ref r


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def approx(t: torch.Tensor, want, rel=1e-6, abs=1e-7):
    return t.tolist() == pytest.approx(want, rel=rel, abs=abs)


# Hypothesis strategies: finite log-probs in a realistic range, small example counts.
logp = st.floats(min_value=-50.0, max_value=0.0, allow_nan=False)
betas = st.floats(min_value=0.01, max_value=2.0)
FEW = settings(max_examples=25, deadline=None)


def batch_of(vals: list[float]) -> tuple[torch.Tensor, ...]:
    """Four (1,) float64 tensors from four floats (float64 so identities hold to ~1e-12)."""
    return tuple(torch.tensor([v], dtype=torch.float64) for v in vals)


# ---------------------------------------------------------------------------------------------
# DPO by hand


def test_dpo_sigmoid_by_hand():
    """beta = 0.1:
    pair 0: beta h = 0.15,  loss = -log sigma(0.15)  = log(1 + e^-0.15) = log(1.860708) = 0.620957
    pair 1: beta h = -0.2,  loss = -log sigma(-0.2)  = log(1 + e^0.2)   = log(2.221403) = 0.798139
    loss = (0.620957 + 0.798139) / 2 = 0.709548
    chosen rewards   = 0.1 * [1.0, -1.0] = [0.1, -0.1]
    rejected rewards = 0.1 * [-0.5, 1.0] = [-0.05, 0.1]
    margins = [0.1 + 0.05, -0.1 - 0.1] = [0.15, -0.2];  accuracy: pair 0 yes, pair 1 no -> 0.5
    """
    out = dpo_sigmoid_loss(*BATCH, beta=0.1)
    assert isinstance(out, DPOOutput)
    assert approx(out.losses, [0.620957, 0.798139], rel=1e-5)
    assert out.loss.item() == pytest.approx(0.709548, rel=1e-5)
    assert approx(out.chosen_rewards, [0.1, -0.1])
    assert approx(out.rejected_rewards, [-0.05, 0.1])
    assert approx(out.margins, [0.15, -0.2])
    assert out.reward_accuracy.item() == 0.5
    assert out.loss.shape == () and out.reward_accuracy.shape == ()


def test_dpo_label_smoothing_by_hand():
    """eps = 0.1, beta = 0.1: loss = 0.9 softplus(-beta h) + 0.1 softplus(beta h).
    softplus(x) = softplus(-x) + x, so this is softplus(-beta h) + eps * beta h:
    pair 0: 0.620957 + 0.1 * 0.15    = 0.635957
    pair 1: 0.798139 + 0.1 * (-0.2)  = 0.778139
    """
    out = dpo_sigmoid_loss(*BATCH, beta=0.1, label_smoothing=0.1)
    assert approx(out.losses, [0.635957, 0.778139], rel=1e-5)


def test_dpo_per_pair_beta_by_hand():
    """beta = [0.1, 0.5]: pair 0 as before, 0.620957; pair 1: beta h = 0.5 * -2 = -1,
    loss = log(1 + e^1) = log(3.718282) = 1.313262; mean = (0.620957 + 1.313262) / 2 = 0.967109.
    Rewards use each pair's beta: chosen = [0.1 * 1, 0.5 * -1] = [0.1, -0.5],
    rejected = [0.1 * -0.5, 0.5 * 1] = [-0.05, 0.5]."""
    out = dpo_sigmoid_loss(*BATCH, beta=torch.tensor([0.1, 0.5]))
    assert approx(out.losses, [0.620957, 1.313262], rel=1e-5)
    assert out.loss.item() == pytest.approx(0.967109, rel=1e-5)
    assert approx(out.chosen_rewards, [0.1, -0.5])
    assert approx(out.rejected_rewards, [-0.05, 0.5])


def test_dpo_gradient_by_hand():
    """d loss / d pc_b = -(1/B) beta (1 - sigma(beta h_b)) and d loss / d pr_b = +the same.
    pair 0: sigma(0.15) = 0.537430 -> -0.5 * 0.1 * 0.462570 = -0.0231285
    pair 1: sigma(-0.2) = 0.450166 -> -0.5 * 0.1 * 0.549834 = -0.0274917
    The reference log-probs get no gradient (detached inside), even if they require it."""
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    rc, rr = RC.clone().requires_grad_(True), RR.clone().requires_grad_(True)
    dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1).loss.backward()
    assert approx(pc.grad, [-0.0231285, -0.0274917], rel=1e-5)
    assert approx(pr.grad, [0.0231285, 0.0274917], rel=1e-5)
    assert rc.grad is None and rr.grad is None


# ---------------------------------------------------------------------------------------------
# IPO by hand


def test_ipo_by_hand():
    """tau = 0.5: target 1 / (2 tau) = 1.
    pair 0: (1.5 - 1)^2 = 0.25;  pair 1: (-2 - 1)^2 = 9;  mean = 4.625.
    Rewards tau * log-ratio: chosen 0.5 * [1, -1] = [0.5, -0.5], rejected 0.5 * [-0.5, 1] = [-0.25, 0.5]."""
    out = ipo_loss(*BATCH, tau=0.5)
    assert approx(out.losses, [0.25, 9.0])
    assert out.loss.item() == pytest.approx(4.625)
    assert approx(out.chosen_rewards, [0.5, -0.5])
    assert approx(out.rejected_rewards, [-0.25, 0.5])


def test_ipo_length_normalised_by_hand():
    """tau = 0.5, chosen lengths [2, 4], rejected lengths [5, 1]: per-token log-ratios
    chosen   = [1.0 / 2, -1.0 / 4] = [0.5, -0.25]
    rejected = [-0.5 / 5, 1.0 / 1] = [-0.1, 1.0]
    h = [0.6, -1.25];  losses = [(0.6 - 1)^2, (-1.25 - 1)^2] = [0.16, 5.0625];  mean = 2.61125."""
    out = ipo_loss(*BATCH, tau=0.5, chosen_lengths=torch.tensor([2, 4]), rejected_lengths=torch.tensor([5, 1]))
    assert approx(out.losses, [0.16, 5.0625])
    assert out.loss.item() == pytest.approx(2.61125)
    assert approx(out.chosen_rewards, [0.25, -0.125])


def test_ipo_needs_both_lengths_or_neither():
    with pytest.raises(ValueError, match="both"):
        ipo_loss(*BATCH, tau=0.5, chosen_lengths=torch.tensor([2, 4]))


# ---------------------------------------------------------------------------------------------
# NLL-anchored DPO by hand


def test_nll_anchored_by_hand():
    """beta = 0.1, alpha = 1 (Pang et al.), chosen NLL = [0.5, 2.0]:
    losses = [0.620957 + 1 * 0.5, 0.798139 + 1 * 2.0] = [1.120957, 2.798139];  mean = 1.959548.
    Rewards/accuracy are DPO's (accuracy 0.5)."""
    out = nll_anchored_dpo_loss(*BATCH, policy_chosen_nll=torch.tensor([0.5, 2.0]), beta=0.1, alpha=1.0)
    assert approx(out.losses, [1.120957, 2.798139], rel=1e-5)
    assert out.loss.item() == pytest.approx(1.959548, rel=1e-5)
    assert out.reward_accuracy.item() == 0.5
    assert approx(out.margins, [0.15, -0.2])


def test_nll_anchored_alpha_zero_is_dpo_and_nll_gets_gradient():
    """alpha = 0 gives DPO exactly; with alpha = 2 the NLL gets d loss / d nll_b = alpha / B = 1."""
    nll = torch.tensor([0.5, 2.0], requires_grad=True)
    zero = nll_anchored_dpo_loss(*BATCH, policy_chosen_nll=nll, beta=0.1, alpha=0.0)
    assert zero.loss.item() == pytest.approx(dpo_sigmoid_loss(*BATCH, beta=0.1).loss.item())
    nll_anchored_dpo_loss(*BATCH, policy_chosen_nll=nll, beta=0.1, alpha=2.0).loss.backward()
    assert approx(nll.grad, [1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# dynamic beta by hand


def test_dynamic_beta_by_hand():
    """beta_ori = 0.1, w = 0.5, k = 1; beta = 0.1 (1 + 0.5 (1 - e^-delta)):
    delta = 0:      1 - 1   = 0   -> 0.1
    delta = ln 2:   1 - 1/2 = 0.5 -> 0.1 * 1.25 = 0.125
    delta = -ln 2:  1 - 2   = -1  -> 0.1 * 0.5  = 0.05   (disagreeing RM: beta shrinks, not clipped)
    delta = -ln 4:  1 - 4   = -3  -> 0.1 * (1 - 1.5) = -0.05 (negative: why clip exists)"""
    delta = torch.tensor([0.0, math.log(2), -math.log(2), -math.log(4)])
    assert approx(dynamic_beta(delta, 0.1, 0.5, 1.0), [0.1, 0.125, 0.05, -0.05])
    assert approx(dynamic_beta(delta, 0.1, 0.5, 1.0, clip=(1e-3, math.inf)), [0.1, 0.125, 0.05, 1e-3])


def test_dynamic_beta_saturates_and_detaches():
    """delta -> inf: e^(-k delta) -> 0, beta -> beta_ori (1 + w) = 0.1 * 1.5 = 0.15.
    The reward margin gets no gradient."""
    delta = torch.tensor([1e4], requires_grad=True)
    beta = dynamic_beta(delta, 0.1, 0.5, 0.5)
    assert beta.item() == pytest.approx(0.15)
    assert not beta.requires_grad


def test_dynamic_beta_feeds_dpo():
    """Per-pair DRS beta into DPO: delta = [ln 2, 0] -> beta = [0.125, 0.1] (as above), so
    pair 0: -log sigma(0.125 * 1.5 = 0.1875) = softplus(-0.1875); pair 1: 0.798139 as before."""
    beta = dynamic_beta(torch.tensor([math.log(2), 0.0]), 0.1, 0.5, 1.0)
    out = dpo_sigmoid_loss(*BATCH, beta=beta)
    assert approx(out.losses, [softplus(-0.1875), 0.798139], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# all_pairs by hand


def test_released_batch_beta_by_hand():
    from mmalign.losses.dpo import released_batch_beta

    # h = [0, 0, 0, 0, 10]: mean 2; 4 of the 5 pairs are drawn (int(0.8 * 5)), so exactly one is
    # left out. Left out the 10: mean(drawn) = 0 -> 0.1 * (1 + 0.1 * (0 - 2)) = 0.08; left out a 0:
    # mean(drawn) = 10 / 4 = 2.5 -> 0.1 * (1 + 0.1 * 0.5) = 0.105. Std (unbiased) = sqrt(80 / 4):
    # weights exp(-0.5 * (2 / sqrt(20))^2) = e^-0.1 for a 0 and exp(-0.5 * (8 / sqrt(20))^2) = e^-1.6
    # for the 10, so the 10 is the likelier one to be left out.
    h = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])
    g = torch.Generator().manual_seed(0)
    got = [released_batch_beta(h, 0.1, 0.1, generator=g).item() for _ in range(400)]
    assert {round(b, 6) for b in got} == {0.08, 0.105}
    # P(the 10 is never drawn) with weights a = e^-0.1 (x4), b = e^-1.6, one draw after another:
    # (4a / (4a + b)) (3a / (3a + b)) (2a / (2a + b)) (a / (a + b)) = 0.649
    a, b = math.exp(-0.1), math.exp(-1.6)
    p = (4 * a / (4 * a + b)) * (3 * a / (3 * a + b)) * (2 * a / (2 * a + b)) * (a / (a + b))
    assert p == pytest.approx(0.649, abs=1e-3)
    assert sum(round(x, 6) == 0.08 for x in got) / len(got) == pytest.approx(p, abs=0.08)
    # the floor: w = 10 -> 0.1 * (1 + 10 * (0 - 2)) < 0 -> 1e-3 (when the 10 is left out)
    assert min(released_batch_beta(h, 0.1, 10.0, generator=g).item() for _ in range(50)) == pytest.approx(1e-3)
    # equal logits: every draw has the batch mean -> beta unchanged
    assert released_batch_beta(torch.full((6,), 3.0), 0.1, 0.1).item() == pytest.approx(0.1)
    # one pair: int(0.8 * 1) = 0 draws (the release's std is NaN there and multinomial raises) -> beta
    assert released_batch_beta(torch.tensor([5.0]), 0.1, 0.1).item() == pytest.approx(0.1)
    assert not released_batch_beta(h.requires_grad_(), 0.1, 0.1).requires_grad  # a constant, as in the release
    with pytest.raises(ValueError, match="keep"):
        released_batch_beta(h, 0.1, 0.1, keep=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        released_batch_beta(torch.zeros(0), 0.1, 0.1)


def test_all_pairs_by_hand():
    """scores [3, 1, 2, 2]: i = 0 (3) beats 1, 2, 3; i = 1 (1) beats nobody; i = 2 (2) beats 1
    only (2 vs 2 is a tie); i = 3 (2) beats 1 only. -> (0,1), (0,2), (0,3), (2,1), (3,1)."""
    assert all_pairs([3, 1, 2, 2]) == [(0, 1), (0, 2), (0, 3), (2, 1), (3, 1)]


def test_all_pairs_edge_cases():
    assert all_pairs([]) == [] and all_pairs([5.0]) == [] and all_pairs([1, 1, 1]) == []
    with pytest.raises(ValueError, match="NaN"):
        all_pairs([1.0, float("nan")])


@FEW
@given(st.lists(st.integers(min_value=0, max_value=4), max_size=6))
def test_all_pairs_counts_every_strict_comparison(scores):
    """Each unordered pair with different scores appears exactly once, oriented high -> low."""
    pairs = all_pairs(scores)
    assert all(scores[i] > scores[j] for i, j in pairs)
    distinct = sum(1 for a in range(len(scores)) for b in range(a + 1, len(scores)) if scores[a] != scores[b])
    assert len(pairs) == len(set(pairs)) == distinct


# ---------------------------------------------------------------------------------------------
# properties


@FEW
@given(st.lists(logp, min_size=2, max_size=2), betas)
def test_dpo_is_log2_when_policy_equals_reference(lps, beta):
    """policy = reference -> h = 0 -> loss = -log sigma(0) = log 2, for any beta (and any eps:
    (1 - eps) log 2 + eps log 2)."""
    c, r = lps
    pc, pr = batch_of([c, r])
    out = dpo_sigmoid_loss(pc, pr, pc.clone(), pr.clone(), beta=beta, label_smoothing=0.2)
    assert out.loss.item() == pytest.approx(math.log(2))
    assert out.reward_accuracy.item() == 0.0                    # a tie is not a win


@FEW
@given(st.lists(logp, min_size=4, max_size=4), betas, st.floats(min_value=0.0, max_value=0.5))
def test_dpo_swap_identity(lps, beta, eps):
    """Swapping chosen and rejected (policy and reference together) sends h -> -h. With
    l_eps(h) = (1 - eps) softplus(-beta h) + eps softplus(beta h) and softplus(x) - softplus(-x) = x:
    l_eps(-h) - l_eps(h) = (1 - eps)(softplus(beta h) - softplus(-beta h))
                           - eps (softplus(beta h) - softplus(-beta h)) = (1 - 2 eps) beta h.
    For plain DPO (eps = 0): l(-h) = l(h) + beta h."""
    pc, pr, rc, rr = batch_of(lps)
    fwd = dpo_sigmoid_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    swp = dpo_sigmoid_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps)
    h = (lps[0] - lps[2]) - (lps[1] - lps[3])
    assert swp.loss.item() == pytest.approx(fwd.loss.item() + (1 - 2 * eps) * beta * h, abs=1e-9)
    assert swp.margins.item() == pytest.approx(-fwd.margins.item(), abs=1e-12)


@FEW
@given(st.lists(st.integers(min_value=-300, max_value=300), min_size=2, max_size=8, unique=True), betas)
def test_dpo_decreases_in_the_margin(tenths, beta):
    """d/dh softplus(-beta h) = -beta (1 - sigma(beta h)) < 0: plain DPO strictly decreases in h.
    (With eps > 0 it does not: the loss is minimised at sigma(beta h) = 1 - eps.) h is fed as the
    policy chosen log-prob with the rest 0, on a 0.1 grid in [-30, 30]."""
    hs = [t / 10 for t in sorted(tenths)]
    h = torch.tensor(hs, dtype=torch.float64)
    zero = torch.zeros_like(h)
    losses = dpo_sigmoid_loss(h, zero, zero, zero, beta=beta).losses
    assert bool((losses[1:] < losses[:-1]).all())


@FEW
@given(st.floats(min_value=0.05, max_value=5.0), st.floats(min_value=-20.0, max_value=20.0))
def test_ipo_minimised_at_target(tau, h):
    """(h - 1/(2 tau))^2 >= 0 with equality, and zero gradient, exactly at h = 1/(2 tau)."""
    zero = torch.zeros(1, dtype=torch.float64)
    target = torch.tensor([1 / (2 * tau)], dtype=torch.float64, requires_grad=True)
    at = ipo_loss(target, zero, zero, zero, tau=tau)
    at.loss.backward()
    assert at.loss.item() == pytest.approx(0.0, abs=1e-20) and target.grad.item() == pytest.approx(0.0, abs=1e-12)
    away = ipo_loss(torch.tensor([h], dtype=torch.float64), zero, zero, zero, tau=tau).loss.item()
    assert away == pytest.approx((h - 1 / (2 * tau)) ** 2) and away >= 0.0


@FEW
@given(st.lists(logp, min_size=12, max_size=12), st.lists(betas, min_size=3, max_size=3))
def test_per_pair_beta_equals_separate_calls(lps, bs):
    """A (B,) beta gives, pair by pair, what a scalar-beta call on that pair alone gives."""
    pc, pr, rc, rr = (torch.tensor(lps[i::4], dtype=torch.float64) for i in range(4))
    together = dpo_sigmoid_loss(pc, pr, rc, rr, beta=torch.tensor(bs, dtype=torch.float64))
    for b in range(3):
        alone = dpo_sigmoid_loss(pc[b:b + 1], pr[b:b + 1], rc[b:b + 1], rr[b:b + 1], beta=bs[b])
        assert together.losses[b].item() == pytest.approx(alone.loss.item(), rel=1e-12)
        assert together.chosen_rewards[b].item() == pytest.approx(alone.chosen_rewards.item(), rel=1e-12)


@FEW
@given(st.floats(min_value=0.01, max_value=1.0), st.floats(min_value=0.0, max_value=2.0),
       st.floats(min_value=0.01, max_value=5.0),
       st.lists(st.floats(min_value=-5.0, max_value=50.0), min_size=2, max_size=6, unique=True))
def test_dynamic_beta_properties(beta_ori, w, k, deltas):
    """delta = 0 -> beta_ori; increasing in delta (w, k > 0; non-decreasing at w = 0); bounded
    above by beta_ori (1 + w); clip bounds respected."""
    d = torch.tensor(sorted(deltas), dtype=torch.float64)
    beta = dynamic_beta(d, beta_ori, w, k)
    assert dynamic_beta(torch.zeros(1, dtype=torch.float64), beta_ori, w, k).item() == pytest.approx(beta_ori)
    assert bool((beta[1:] >= beta[:-1]).all())
    assert bool((beta <= beta_ori * (1 + w) + 1e-12).all())
    low, high = 0.9 * beta_ori, 1.1 * beta_ori
    clipped = dynamic_beta(d, beta_ori, w, k, clip=(low, high))
    assert bool((clipped >= low).all()) and bool((clipped <= high).all())
    assert torch.equal(clipped, beta.clamp(low, high))


@pytest.mark.parametrize("loss", ["dpo", "ipo", "nll"])
def test_gradients_reach_policy_not_reference(loss):
    """Every loss: policy log-probs get a nonzero gradient, reference log-probs none at all."""
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    rc, rr = RC.clone().requires_grad_(True), RR.clone().requires_grad_(True)
    if loss == "dpo":
        out = dpo_sigmoid_loss(pc, pr, rc, rr, beta=torch.tensor([0.1, 0.3]))
    elif loss == "ipo":
        out = ipo_loss(pc, pr, rc, rr, tau=0.5, chosen_lengths=torch.tensor([2, 4]), rejected_lengths=torch.tensor([5, 1]))
    else:
        out = nll_anchored_dpo_loss(pc, pr, rc, rr, policy_chosen_nll=-pc / 3, beta=0.1, alpha=1.0)
    out.loss.backward()
    assert bool((pc.grad != 0).all()) and bool((pr.grad != 0).all())
    assert rc.grad is None and rr.grad is None
    for t in (out.chosen_rewards, out.rejected_rewards, out.margins, out.reward_accuracy):
        assert not t.requires_grad


# ---------------------------------------------------------------------------------------------
# argument checks


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="shape"):
        dpo_sigmoid_loss(PC, PR, RC, torch.zeros(3), beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_sigmoid_loss(*BATCH, beta=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="beta"):
        dpo_sigmoid_loss(*BATCH, beta=torch.tensor([0.1, -0.05]))     # e.g. an unclipped DRS beta
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_sigmoid_loss(*BATCH, beta=0.1, label_smoothing=0.7)
    with pytest.raises(ValueError, match="tau"):
        ipo_loss(*BATCH, tau=0.0)
    with pytest.raises(ValueError, match="clip"):
        dynamic_beta(torch.zeros(2), 0.1, 0.5, 1.0, clip=(1.0, 0.1))
