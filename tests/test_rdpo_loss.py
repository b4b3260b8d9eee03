"""Re-Align's rDPO loss, derived by hand on a two-pair batch, plus its properties.

The two pairs of tests/test_dpo_losses.py, plus the chosen answer scored with the retrieved image:

            pc     rc     pr     rr    pci (policy, chosen | retrieved img)   rci (reference)
    pair 0: -1.0   -2.0   -3.0   -2.5         -5.0                               -4.0
    pair 1: -4.0   -3.0   -2.0   -3.0         -3.0                               -4.5

chosen log-ratio          pc - rc   = [ 1.0, -1.0]
rejected log-ratio        pr - rr   = [-0.5,  1.0]
retrieved-image log-ratio pci - rci = [-1.0,  1.5]
text margin   h_t = [1.0 - (-0.5), -1.0 - 1.0] = [1.5, -2.0]
visual margin h_v = [1.0 - (-1.0), -1.0 - 1.5] = [2.0, -2.5]

Pair 0 is learned on both terms, pair 1 on neither. softplus(x) = log(1 + e^x), -log sigma(x) =
softplus(-x), and softplus(x) - softplus(-x) = x.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmalign.losses.dpo import DPOOutput, dpo_sigmoid_loss
from mmalign.losses.rdpo import RDPOOutput, rdpo_loss

PC = torch.tensor([-1.0, -4.0])
RC = torch.tensor([-2.0, -3.0])
PR = torch.tensor([-3.0, -2.0])
RR = torch.tensor([-2.5, -3.0])
PCI = torch.tensor([-5.0, -3.0])
RCI = torch.tensor([-4.0, -4.5])
BATCH = (PC, PR, RC, RR, PCI, RCI)   # the argument order: pc, pr, rc, rr, pci, rci


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def approx(t: torch.Tensor, want, rel=1e-6, abs=1e-7):
    return t.tolist() == pytest.approx(want, rel=rel, abs=abs)


logp = st.floats(min_value=-50.0, max_value=0.0, allow_nan=False)
small_logp = st.floats(min_value=-10.0, max_value=0.0, allow_nan=False)
betas = st.floats(min_value=0.01, max_value=2.0)
weights = st.floats(min_value=0.0, max_value=3.0)
FEW = settings(max_examples=25, deadline=None)


def batch_of(vals: list[float]) -> tuple[torch.Tensor, ...]:
    """Six (1,) float64 tensors from six floats, in the argument order."""
    return tuple(torch.tensor([v], dtype=torch.float64) for v in vals)


def with_grad(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.clone().requires_grad_(True) for t in ts)


# ---------------------------------------------------------------------------------------------
# by hand


def test_rdpo_by_hand_released_defaults():
    """beta = 0.1, weights text 1, visual 1, anchor 0 (Re-Align's released objective).
    text   (tests/test_dpo_losses.py): -log sigma(0.15) = 0.620957, -log sigma(-0.2) = 0.798139
    visual: beta h_v = [0.2, -0.25]
        pair 0: softplus(-0.2)  = log(1 + 0.818731) = log(1.818731) = 0.598139
                (= softplus(0.2) - 0.2 = 0.798139 - 0.2, the text pair 1 number shifted)
        pair 1: softplus(0.25)  = log(1 + 1.284025) = log(2.284025) = 0.825939
    losses = [0.620957 + 0.598139, 0.798139 + 0.825939] = [1.219096, 1.624078]
    loss   = (1.219096 + 1.624078) / 2 = 1.421587
    visual rewards: chosen 0.1 * [1, -1] = [0.1, -0.1]; retrieved 0.1 * [-1, 1.5] = [-0.1, 0.15];
    margins [0.2, -0.25]; accuracy: pair 0 yes, pair 1 no -> 0.5."""
    out = rdpo_loss(*BATCH, beta=0.1)
    assert isinstance(out, RDPOOutput)
    assert isinstance(out.text, DPOOutput) and isinstance(out.visual, DPOOutput)
    assert approx(out.text.losses, [0.620957, 0.798139], rel=1e-5)
    assert approx(out.visual.losses, [0.598139, 0.825939], rel=1e-5)
    assert approx(out.losses, [1.219096, 1.624078], rel=1e-5)
    assert out.loss.item() == pytest.approx(1.421587, rel=1e-5)
    assert approx(out.visual.chosen_rewards, [0.1, -0.1])
    assert approx(out.visual.rejected_rewards, [-0.1, 0.15])
    assert approx(out.visual.margins, [0.2, -0.25])
    assert out.visual.reward_accuracy.item() == 0.5
    assert approx(out.text.margins, [0.15, -0.2]) and out.text.reward_accuracy.item() == 0.5
    assert out.loss.shape == () and out.losses.shape == (2,) and out.anchor_losses.shape == (2,)


def test_anchor_by_hand():
    """anchor = -log sigma(beta (pc - rc) - delta), beta (pc - rc) = [0.1, -0.1].
    delta = 0 (mDPO's code): [softplus(-0.1), softplus(0.1)] = [log(1.904837), log(2.105171)]
                                                            = [0.644397, 0.744397]
    delta = 0.05: [softplus(-0.05), softplus(0.15)] = [0.668460, 0.770957]
                  (softplus(0.15) = softplus(-0.15) + 0.15 = 0.620957 + 0.15)."""
    assert approx(rdpo_loss(*BATCH, beta=0.1).anchor_losses, [0.644397, 0.744397], rel=1e-5)
    out = rdpo_loss(*BATCH, beta=0.1, anchor_weight=1.0, anchor_delta=0.05)
    assert approx(out.anchor_losses, [0.668460, 0.770957], rel=1e-5)
    assert approx(out.losses, [1.219096 + 0.668460, 1.624078 + 0.770957], rel=1e-5)


def test_weighted_mix_by_hand():
    """text 0.5, visual 2, anchor 1 (delta 0):
    pair 0: 0.5 * 0.620957 + 2 * 0.598139 + 0.644397 = 0.310479 + 1.196278 + 0.644397 = 2.151153
    pair 1: 0.5 * 0.798139 + 2 * 0.825939 + 0.744397 = 0.399069 + 1.651879 + 0.744397 = 2.795345
    mean = 2.473249. The terms' own losses stay unweighted."""
    out = rdpo_loss(*BATCH, beta=0.1, text_weight=0.5, visual_weight=2.0, anchor_weight=1.0)
    assert approx(out.losses, [2.151153, 2.795345], rel=1e-5)
    assert out.loss.item() == pytest.approx(2.473249, rel=1e-5)
    assert approx(out.text.losses, [0.620957, 0.798139], rel=1e-5)
    assert out.text.loss.item() == pytest.approx((0.620957 + 0.798139) / 2, rel=1e-5)


def test_nll_term_by_hand():
    """nll_weight 0.25 (an SFT mix), chosen NLL [0.5, 2.0]: losses = [1.219096 + 0.125,
    1.624078 + 0.5] = [1.344096, 2.124078]; d loss / d nll_b = 0.25 / B = 0.125."""
    nll = torch.tensor([0.5, 2.0], requires_grad=True)
    out = rdpo_loss(*BATCH, beta=0.1, policy_chosen_nll=nll, nll_weight=0.25)
    assert approx(out.losses, [1.344096, 2.124078], rel=1e-5)
    out.loss.backward()
    assert approx(nll.grad, [0.125, 0.125])


def test_gradient_by_hand():
    """With sigma(0.15) = 0.537430, sigma(-0.2) = 0.450166 (text) and sigma(0.2) = 0.549834,
    sigma(-0.25) = 0.437823 (visual), B = 2, beta = 0.1:
    d loss / d pr_b  = +(1/B) beta (1 - sigma(beta h_t)) = [0.0231285, 0.0274917]
    d loss / d pci_b = +(1/B) beta (1 - sigma(beta h_v)) = [0.0225083, 0.0281088]
    d loss / d pc_b  = -(both)                           = [-0.0456368, -0.0556005]
    pc sits in both terms, so its gradient is the sum; the references get none."""
    pc, pr, rc, rr, pci, rci = with_grad(*BATCH)
    rdpo_loss(pc, pr, rc, rr, pci, rci, beta=0.1).loss.backward()
    assert approx(pr.grad, [0.0231285, 0.0274917], rel=1e-5)
    assert approx(pci.grad, [0.0225083, 0.0281088], rel=1e-5)
    assert approx(pc.grad, [-0.0456368, -0.0556005], rel=1e-5)
    assert rc.grad is None and rr.grad is None and rci.grad is None


def test_per_pair_beta_is_shared_by_all_terms():
    """beta = [0.1, 0.5]: pair 0 as above (1.219096); pair 1: text -log sigma(0.5 * -2) =
    softplus(1) = 1.313262, visual -log sigma(0.5 * -2.5) = softplus(1.25) = log(1 + 3.490343)
    = 1.501929; total 2.815191. Visual retrieved-image rewards: [0.1 * -1, 0.5 * 1.5] = [-0.1, 0.75]."""
    out = rdpo_loss(*BATCH, beta=torch.tensor([0.1, 0.5]))
    assert approx(out.losses, [1.219096, 2.815191], rel=1e-5)
    assert approx(out.visual.rejected_rewards, [-0.1, 0.75])


# ---------------------------------------------------------------------------------------------
# the terms are DPO losses


def test_visual_term_alone_is_dpo_with_image_logratios():
    """text_weight = 0: rDPO = DPO with the retrieved-image log-probs in the rejected slot."""
    out = rdpo_loss(*BATCH, beta=0.1, text_weight=0.0)
    ref = dpo_sigmoid_loss(PC, PCI, RC, RCI, beta=0.1)
    assert torch.allclose(out.losses, ref.losses) and torch.allclose(out.loss, ref.loss)
    for a, b in zip(out.visual, ref):
        assert torch.allclose(a, b)


def test_text_term_alone_is_dpo():
    """visual_weight = 0: rDPO = plain DPO on (pc, pr, rc, rr)."""
    out = rdpo_loss(*BATCH, beta=0.1, visual_weight=0.0)
    ref = dpo_sigmoid_loss(PC, PR, RC, RR, beta=0.1)
    assert torch.allclose(out.losses, ref.losses)
    for a, b in zip(out.text, ref):
        assert torch.allclose(a, b)


def test_zero_weight_switches_a_term_off():
    """A zero weight removes the term from the loss and its inputs from the gradient: with
    text_weight = 0, moving pr/rr leaves the loss unchanged and pr gets a zero gradient; with
    visual_weight = 0 the same holds for pci/rci."""
    base = rdpo_loss(*BATCH, beta=0.1, text_weight=0.0).loss
    moved = rdpo_loss(PC, PR + 3.0, RC, RR - 1.0, PCI, RCI, beta=0.1, text_weight=0.0).loss
    assert moved.item() == pytest.approx(base.item())
    pc, pr, rc, rr, pci, rci = with_grad(*BATCH)
    rdpo_loss(pc, pr, rc, rr, pci, rci, beta=0.1, text_weight=0.0).loss.backward()
    assert bool((pr.grad == 0).all()) and bool((pci.grad != 0).all())

    base = rdpo_loss(*BATCH, beta=0.1, visual_weight=0.0).loss
    moved = rdpo_loss(PC, PR, RC, RR, PCI - 2.0, RCI + 1.0, beta=0.1, visual_weight=0.0).loss
    assert moved.item() == pytest.approx(base.item())
    pc, pr, rc, rr, pci, rci = with_grad(*BATCH)
    rdpo_loss(pc, pr, rc, rr, pci, rci, beta=0.1, visual_weight=0.0).loss.backward()
    assert bool((pci.grad == 0).all()) and bool((pr.grad != 0).all())


# ---------------------------------------------------------------------------------------------
# properties


@FEW
@given(st.lists(logp, min_size=3, max_size=3), betas)
def test_log2_per_term_when_policy_equals_reference(lps, beta):
    """policy = reference -> every log-ratio is 0 -> each term is -log sigma(0) = log 2, the
    anchor too (delta = 0): loss = (text_w + visual_w + anchor_w) log 2; no pair is won."""
    c, r, ci = batch_of(lps)
    out = rdpo_loss(c, r, c.clone(), r.clone(), ci, ci.clone(), beta=beta,
                    text_weight=1.0, visual_weight=2.0, anchor_weight=0.5)
    assert out.text.loss.item() == pytest.approx(math.log(2))
    assert out.visual.loss.item() == pytest.approx(math.log(2))
    assert out.anchor_losses.item() == pytest.approx(math.log(2))
    assert out.loss.item() == pytest.approx(3.5 * math.log(2))
    assert out.text.reward_accuracy.item() == 0.0 and out.visual.reward_accuracy.item() == 0.0


@FEW
@given(st.lists(logp, min_size=6, max_size=6), betas, weights, weights, weights)
def test_total_is_the_weighted_sum_of_the_terms(lps, beta, tw, vw, aw):
    """losses == tw * text.losses + vw * visual.losses + aw * anchor_losses, for any weights."""
    if tw == vw == aw == 0.0:
        tw = 1.0
    out = rdpo_loss(*batch_of(lps), beta=beta, text_weight=tw, visual_weight=vw, anchor_weight=aw)
    want = tw * out.text.losses + vw * out.visual.losses + aw * out.anchor_losses
    assert out.losses.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)


@FEW
@given(st.lists(logp, min_size=6, max_size=6), betas)
def test_swapping_the_images_flips_the_visual_margin(lps, beta):
    """Swapping the original and the retrieved image for y_w (pc <-> pci and rc <-> rci, both
    models) sends h_v -> -h_v, so visual(-h) = visual(h) + beta h_v (softplus(x) - softplus(-x)
    = x). The text term instead sees a different chosen log-ratio, so only the visual term has
    this symmetry."""
    pc, pr, rc, rr, pci, rci = batch_of(lps)
    fwd = rdpo_loss(pc, pr, rc, rr, pci, rci, beta=beta)
    swp = rdpo_loss(pci, pr, rci, rr, pc, rc, beta=beta)
    h_v = (lps[0] - lps[2]) - (lps[4] - lps[5])
    assert swp.visual.loss.item() == pytest.approx(fwd.visual.loss.item() + beta * h_v, abs=1e-9)
    assert swp.visual.margins.item() == pytest.approx(-fwd.visual.margins.item(), abs=1e-12)


@FEW
@given(st.lists(logp, min_size=6, max_size=6), betas, st.lists(logp, min_size=2, max_size=2))
def test_text_term_ignores_the_retrieved_image(lps, beta, other):
    """The retrieved-image log-probs reach only the visual term: changing them leaves ``text``
    (and the anchor) exactly as they were."""
    pc, pr, rc, rr, pci, rci = batch_of(lps)
    a = rdpo_loss(pc, pr, rc, rr, pci, rci, beta=beta)
    pci2, rci2 = batch_of(other)
    b = rdpo_loss(pc, pr, rc, rr, pci2, rci2, beta=beta)
    assert torch.equal(a.text.losses, b.text.losses) and torch.equal(a.anchor_losses, b.anchor_losses)


@FEW
@given(st.lists(small_logp, min_size=6, max_size=6), betas,
       st.floats(min_value=0.1, max_value=3.0), st.floats(min_value=0.1, max_value=3.0), weights)
def test_gradient_signs(lps, beta, tw, vw, aw):
    """Every term is -log sigma(increasing in pc), so d loss / d pc < 0; pr enters the text term
    and pci the visual term with a minus sign, so their gradients are > 0. (Log-probs in
    [-10, 0] keep |beta h| <= 40, where 1 - sigma is still a positive float64.) The reference
    inputs get no gradient at all."""
    pc, pr, rc, rr, pci, rci = with_grad(*batch_of(lps))
    rdpo_loss(pc, pr, rc, rr, pci, rci, beta=beta, text_weight=tw, visual_weight=vw,
              anchor_weight=aw).loss.backward()
    assert pc.grad.item() < 0 and pr.grad.item() > 0 and pci.grad.item() > 0
    assert rc.grad is None and rr.grad is None and rci.grad is None


@FEW
@given(st.lists(st.integers(min_value=-300, max_value=300), min_size=2, max_size=8, unique=True), betas)
def test_decreases_in_the_chosen_logprob(tenths, beta):
    """Fed as pc with everything else 0, x drives all three terms: text h_t = x, visual h_v = x,
    anchor beta x; each softplus(-beta x) is strictly decreasing, so is their sum (x on a 0.1 grid
    in [-30, 30])."""
    x = torch.tensor([t / 10 for t in sorted(tenths)], dtype=torch.float64)
    z = torch.zeros_like(x)
    losses = rdpo_loss(x, z, z, z, z, z, beta=beta, anchor_weight=1.0).losses
    assert bool((losses[1:] < losses[:-1]).all())


@pytest.mark.parametrize("kw", [{}, {"anchor_weight": 1.0, "anchor_delta": 0.3},
                                {"text_weight": 0.0}, {"visual_weight": 0.0}])
def test_gradients_reach_policy_not_reference(kw):
    """Whatever the weights, the three reference inputs get no gradient, and every reward,
    margin and accuracy is detached."""
    pc, pr, rc, rr, pci, rci = with_grad(*BATCH)
    out = rdpo_loss(pc, pr, rc, rr, pci, rci, beta=torch.tensor([0.1, 0.3]), **kw)
    out.loss.backward()
    assert bool((pc.grad != 0).all())
    assert rc.grad is None and rr.grad is None and rci.grad is None
    for term in (out.text, out.visual):
        for t in (term.chosen_rewards, term.rejected_rewards, term.margins, term.reward_accuracy):
            assert not t.requires_grad


# ---------------------------------------------------------------------------------------------
# argument checks


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="shape"):
        rdpo_loss(PC, PR, RC, RR, PCI, torch.zeros(3), beta=0.1)
    with pytest.raises(ValueError, match="visual_weight"):
        rdpo_loss(*BATCH, beta=0.1, visual_weight=-1.0)
    with pytest.raises(ValueError, match="identically 0"):
        rdpo_loss(*BATCH, beta=0.1, text_weight=0.0, visual_weight=0.0)
    with pytest.raises(ValueError, match="policy_chosen_nll"):
        rdpo_loss(*BATCH, beta=0.1, nll_weight=0.5)
    with pytest.raises(ValueError, match="beta"):
        rdpo_loss(*BATCH, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        rdpo_loss(*BATCH, beta=0.1, policy_chosen_nll=torch.zeros(3), nll_weight=1.0)
