"""The SFT loss, both normalisations, derived by hand on a tiny batch.

Two examples, four positions; example 0 has 1 scored token (a "Yes."-like answer), example 1
has 3 (a caption-like answer); the unscored positions hold junk that must not count:

    logps = [[-1.0, 99, 99, 99],        mask = [[1, 0, 0, 0],
             [-2.0, -3.0, -4.0, 99]]            [1, 1, 1, 0]]

"token":   N = 1 + 3 = 4 scored tokens
           loss = -(-1 - 2 - 3 - 4) / 4 = 10 / 4 = 2.5
           example 0 gets 1/4 of the weight, example 1 gets 3/4.
"example": example 0: -(-1) / 1 = 1.0;   example 1: -(-2 - 3 - 4) / 3 = 9 / 3 = 3.0
           loss = (1.0 + 3.0) / 2 = 2.0
           each example gets 1/2 of the weight; example 0's one token has weight 1/2 (vs 1/4),
           each of example 1's tokens 1/6 (vs 1/4).
"""

from __future__ import annotations

import pytest
import torch

from mmalign.losses.sft import sft_loss

LOGPS = torch.tensor([[-1.0, 99.0, 99.0, 99.0],
                      [-2.0, -3.0, -4.0, 99.0]])
MASK = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                     [1.0, 1.0, 1.0, 0.0]])


def test_token_normalisation_by_hand():
    assert sft_loss(LOGPS, MASK, "token").item() == pytest.approx(10 / 4)


def test_example_normalisation_by_hand():
    assert sft_loss(LOGPS, MASK, "example").item() == pytest.approx((1.0 + 9 / 3) / 2)


def test_token_is_the_default_and_matches_the_old_formula():
    from mmalign.ops import masked_mean
    assert sft_loss(LOGPS, MASK).item() == pytest.approx(-masked_mean(LOGPS, MASK).item())


@pytest.mark.parametrize("norm", ["token", "example"])
def test_gradient_weights_by_hand(norm):
    """d loss / d logps[b, t] = -(weight of that token): 1/4 each under "token"; 1/2 for example
    0's token and 1/6 for each of example 1's under "example"; 0 at unscored positions."""
    lp = LOGPS.clone().requires_grad_(True)
    sft_loss(lp, MASK, norm).backward()
    if norm == "token":
        want = [[1 / 4, 0, 0, 0], [1 / 4, 1 / 4, 1 / 4, 0]]
    else:
        want = [[1 / 2, 0, 0, 0], [1 / 6, 1 / 6, 1 / 6, 0]]
    assert torch.allclose(-lp.grad, torch.tensor(want))


def test_example_without_scored_tokens_is_left_out():
    """A row with nothing scored neither counts as an example nor divides by zero."""
    logps = torch.cat([LOGPS, torch.full((1, 4), 7.0)])
    mask = torch.cat([MASK, torch.zeros(1, 4)])
    assert sft_loss(logps, mask, "example").item() == pytest.approx(2.0)
    assert sft_loss(logps, mask, "token").item() == pytest.approx(2.5)


@pytest.mark.parametrize("norm", ["token", "example"])
def test_nothing_scored_gives_zero(norm):
    assert sft_loss(LOGPS, torch.zeros_like(MASK), norm).item() == 0.0


def test_equal_lengths_make_both_the_same():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert sft_loss(LOGPS, mask, "example").item() == pytest.approx(sft_loss(LOGPS, mask, "token").item())


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="normalization"):
        sft_loss(LOGPS, MASK, "sequence")


def test_module_option_is_a_hyperparameter():
    """The option reaches ``hparams`` through PolicyModule's save_hyperparameters (so it lands in
    checkpoints) and the module uses it."""
    from mmalign.methods.base import OptimArgs
    from mmalign.methods.sft import SFTModule

    class Stub(torch.nn.Module):
        pass

    m = SFTModule(Stub(), loss_normalization="example", optim=OptimArgs(lr=2e-3))
    assert m.hparams.loss_normalization == "example" and m.hparams.optim["lr"] == 2e-3
    assert SFTModule(Stub()).hparams.loss_normalization == "token"
    with pytest.raises(ValueError, match="loss_normalization"):
        SFTModule(Stub(), loss_normalization="sequence")


def test_config_key_is_type_checked(tmp_path):
    """``loss_normalization`` is a YAML key of the SFT config; a value outside the two is refused."""
    from pathlib import Path

    from mmalign.cli import check_config

    text = (Path(__file__).resolve().parents[1] / "configs/sft/tiny.yaml").read_text()
    text = "\n".join(line for line in text.splitlines() if "loss_normalization" not in line)
    text = text.replace("    optim:", "    loss_normalization: NORM\n    optim:")
    for norm in ("token", "example"):
        (tmp_path / "ok.yaml").write_text(text.replace("NORM", norm))
        check_config(str(tmp_path / "ok.yaml"))
    (tmp_path / "bad.yaml").write_text(text.replace("NORM", "sequence"))
    with pytest.raises(Exception, match="loss_normalization"):
        check_config(str(tmp_path / "bad.yaml"))
