"""PPO with fine-grained, segment-level rewards: reward placement, KL-penalised token rewards, GAE,
whitening, and the clipped policy and value losses.

Every per-token tensor is ``(B, L)`` over the *response* tokens only (no image or prompt tokens),
with ``mask`` ``(B, L)`` (bool or 0/1 float) = 1 on real response tokens and right padding after
each response's end. Index ``t`` is the ``t``-th generated token; the value ``V_t`` is the value
head's estimate at that token and ``logprobs[b, t] = log pi(y_t | y_<t, image, prompt)``.

The reward of one response
--------------------------
Fine-Grained RLHF (Wu et al. 2023, "Fine-Grained Human Feedback Gives Better Rewards for Language
Model Training", arXiv 2306.01693, sec. 2) gives each segment ``j`` of the response (a sub-sentence,
sentence or the whole sequence, ending on token ``T_j^k``) a reward ``R_j^k`` per feedback type
``k``, and the per-token reward

    r_t = sum_k sum_j 1(t = T_j^k) w_k R_j^k  -  beta * log(P_theta(y_t | .) / P_init(y_t | .))

FGAIF (Jing & Du 2024, "FGAIF: Aligning Large Vision-Language Models with Fine-grained AI Feedback",
arXiv 2404.05046, sec. 3.3) uses three types on the same sub-sentence segments, object existence,
attribute and relation hallucination, so at a segment's last token the reward is
``w_o R_o + w_a R_a + w_r R_r``. Here:

* :func:`combine_type_rewards` forms ``sum_k w_k R_k`` per segment (types sharing the segments);
* :func:`place_segment_rewards` puts each segment's value on its last token (types on *different*
  segmentations: place each type, then sum ``w_k * placed_k``; placement is linear);
* :func:`place_sequence_reward` is the sequence-level ablation (one reward on the last token);
* :func:`kl_penalty` and :func:`token_rewards` subtract ``beta * KL_t`` on every token (Ziegler et
  al. 2019, "Fine-Tuning Language Models from Human Preferences"). ``k1 = log pi - log ref`` is the
  papers' term; ``k3 = (r - 1) - log r``, ``r = ref / pi``, is Schulman's low-variance non-negative
  estimator ("Approximating KL Divergence", 2020).

Advantages and losses
---------------------
* GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", eq. 16): ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``,
  ``V`` and ``A`` beyond a response's last token 0 (the episode ends there); returns ``A_t + V_t``.
  Defaults ``gamma = lam = 1`` are the released FGAIF / Fine-Grained RLHF values.
* PPO-clip (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7), as a loss to
  minimise: ``rho_t = exp(logp_t - old_t)``, ``loss = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps,
  1 + eps))``. Positive advantage = better than expected: the loss pushes its token's probability up.
* Clipped value loss (OpenAI baselines ``ppo2``, kept by TRL and Fine-Grained RLHF):
  ``0.5 * mean_t max((V_t - R_t)^2, (old_t + clip(V_t - old_t, -c, c) - R_t)^2)``, weighted in the
  total loss by the caller's ``vf_coef`` (0.1 in the released FGAIF trainer and in
  :class:`mmalign.methods.fgaif.FGAIFModule`).

Means over tokens are over every masked token of the batch (one token, one weight; long responses
weigh more), as in Fine-Grained RLHF's ``reduce_mean`` and TRL. The rollout quantities (old
log-probs, advantages, old values, returns) are constants: the losses detach them, and
:func:`token_rewards` and :func:`gae` return tensors without gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmalign.ops import masked_mean

__all__ = ["combine_type_rewards", "gae", "kl_penalty", "masked_entropy", "place_segment_rewards",
           "place_sequence_reward", "ppo_policy_loss", "ppo_value_loss", "token_rewards", "whiten"]

KL_KINDS = ("k1", "abs", "mse", "k3")


# ---------------------------------------------------------------------------------------------
# helpers


def _check_same(**xs: torch.Tensor) -> tuple[int, ...]:
    """All named tensors must be 2-D and of one shape; returns it."""
    shapes = {name: tuple(x.shape) for name, x in xs.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected (B, L) tensors of one shape, got {shapes}")
    return first


def _bool_mask(mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``mask`` as a bool tensor of ``shape``; a float mask must hold only 0 and 1."""
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    # A fractional mask would silently act as a token weight in some places and as 1 in others.
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be bool or hold only 0 and 1")
    return mask != 0


def _zero_pad(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x`` with 0 outside the bool mask ``m``. ``where`` rather than ``x * m`` so that NaN or inf
    left in padding (never computed, or garbage from a batched forward) cannot leak in."""
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_right_padded(m: torch.Tensor) -> None:
    """Each row must be ``1 ... 1 0 ... 0``: a hole would end GAE's episode early, silently."""
    if m.shape[1] > 1 and bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError("mask must be right-padded: each row 1 on its response tokens, then only 0")


# ---------------------------------------------------------------------------------------------
# rewards


def place_segment_rewards(end_index: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                          length: int) -> torch.Tensor:
    """Each segment's reward on the segment's last token: ``out[b, end_index[b, s]] += values[b, s]``.

    Args:
        end_index: ``(B, S)`` integer position of each segment's last token in the response,
            in ``[0, length)`` where ``valid``.
        values: ``(B, S)`` reward of each segment (e.g. from :func:`combine_type_rewards`).
        valid: ``(B, S)`` bool, False on padding entries (rows with fewer than ``S`` segments);
            those are ignored whatever their index or value (NaN included).
        length: ``L``, the number of response positions of the output.

    Returns:
        ``(B, L)`` in ``values``' dtype, 0 where no segment ends. Two segments ending on one token
        add. The total is conserved: ``out.sum(1) == (values * valid).sum(1)``. Differentiable in
        ``values`` (rewards are usually constants, but nothing here needs them to be).
    """
    shapes = {"end_index": tuple(end_index.shape), "values": tuple(values.shape), "valid": tuple(valid.shape)}
    if end_index.ndim != 2 or len(set(shapes.values())) != 1:
        raise ValueError(f"expected end_index, values and valid of one (B, S) shape, got {shapes}")
    if end_index.dtype.is_floating_point or end_index.dtype == torch.bool:
        raise ValueError(f"end_index must be an integer tensor, got {end_index.dtype}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    ok = valid.bool()
    bad = ok & ((end_index < 0) | (end_index >= length))
    if bool(bad.any()):
        raise ValueError(f"valid segment end(s) outside [0, {length}): {end_index[bad].tolist()}")
    index = torch.where(ok, end_index.long(), torch.zeros((), dtype=torch.long, device=end_index.device))
    out = values.new_zeros(values.shape[0], length)
    return out.scatter_add(1, index, _zero_pad(values, ok))


def combine_type_rewards(values: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The weighted sum of per-type segment rewards, ``sum_k w_k R_k`` (FGAIF: ``w_o R_o + w_a R_a + w_r R_r``).

    Args:
        values: feedback type -> ``(B, S)`` segment rewards, all of one shape and on the same
            segments (entry ``[b, s]`` of every type is segment ``s`` of response ``b``).
        weights: feedback type -> weight ``w_k``. Every type in ``values`` needs one; weights of
            types absent from ``values`` are ignored (one config can serve ablations that drop a type).

    Returns:
        ``(B, S)``, to pass as ``values`` to :func:`place_segment_rewards`.
    """
    if not values:
        raise ValueError("values is empty: no reward types to combine")
    missing = sorted(set(values) - set(weights))
    if missing:
        raise ValueError(f"no weight for reward type(s) {missing}; weights given for {sorted(weights)}")
    shapes = {k: tuple(v.shape) for k, v in values.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected (B, S) reward tensors of one shape, got {shapes}")
    return sum(float(weights[k]) * v for k, v in values.items())


def aggregate_segment_rewards(values: torch.Tensor, valid: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Scale each response's segment rewards so that their total is the sum or the mean over its segments.

    ``mode="sum"`` is FGAIF's (and Fine-Grained RLHF's) reward: every segment keeps its reward, so a
    response's total grows with its number of segments. With +1 for every correct segment that
    total pays for *saying more*: PPO on the judge's right verdicts lengthened the captions and
    raised CHAIR_i (docs/RESULTS.md, "FGAIF with the judge's verdicts as rewards").
    ``mode="mean"`` divides the rewards of a response by its number of valid segments, so its total
    is the mean segment reward: length-neutral (not in the paper; the option that measures the
    length incentive). Rows with no valid segment stay 0.

    Args:
        values: ``(B, S)`` segment rewards (e.g. from :func:`combine_type_rewards`).
        valid: ``(B, S)`` bool, False on padding entries; those come out 0 (NaN included).
        mode: "sum" or "mean".

    Returns:
        ``(B, S)``, to pass as ``values`` to :func:`place_segment_rewards`.
    """
    if mode not in ("sum", "mean"):
        raise ValueError(f"mode must be 'sum' or 'mean', not {mode!r}")
    if values.shape != valid.shape or values.ndim != 2:
        raise ValueError(f"expected values and valid of one (B, S) shape, got {tuple(values.shape)} and "
                         f"{tuple(valid.shape)}")
    ok = valid.bool()
    out = torch.where(ok, values, torch.zeros_like(values))
    if mode == "mean":
        out = out / ok.sum(dim=1, keepdim=True).clamp(min=1).to(values.dtype)
    return out


def place_sequence_reward(total: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One reward per response on its last real token (the sequence-level reward / ablation).

    Args:
        total: ``(B,)`` reward of each response.
        mask: ``(B, L)`` response-token mask. A row with no token is an error (nowhere to put it).

    Returns:
        ``(B, L)`` in ``total``'s dtype, ``total[b]`` at the last position where ``mask[b]`` is 1.
    """
    if total.ndim != 1 or mask.ndim != 2 or mask.shape[0] != total.shape[0]:
        raise ValueError(f"expected total (B,) and mask (B, L), got {tuple(total.shape)} and {tuple(mask.shape)}")
    m = _bool_mask(mask, tuple(mask.shape))
    empty = (~m.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"row(s) {empty} have no response token: nowhere to place the reward")
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).max(dim=1).values      # (B,)
    out = total.new_zeros(m.shape)
    return out.scatter(1, last.unsqueeze(1), total.unsqueeze(1))


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || ref)`` from the sampled tokens (sampled from ``pi``).

    With ``d = logprobs - ref_logprobs``:

    * ``"k1"``: ``d``, unbiased, can be negative per token (the papers' ``log P_theta / P_init``);
    * ``"abs"``: ``|d|``;
    * ``"mse"``: ``0.5 d^2``;
    * ``"k3"``: ``(r - 1) - log r`` with ``r = exp(-d) = ref / pi``: unbiased and >= 0 (Schulman 2020).

    Args:
        logprobs: ``(B, L)`` log-probs of the sampled tokens under the policy.
        ref_logprobs: ``(B, L)`` same under the reference (initial) policy.
        kind: one of ``"k1"``, ``"abs"``, ``"mse"``, ``"k3"``.

    Returns:
        ``(B, L)``, not masked (see :func:`token_rewards`). Gradient flows as the inputs allow.
    """
    _check_same(logprobs=logprobs, ref_logprobs=ref_logprobs)
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d.square()
    if kind == "k3":
        # (r - 1) - log r with log r = -d; expm1 keeps r - 1 exact when the policies are close.
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def token_rewards(placed: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards: ``r_t = placed_t - kl_coef * KL_t`` on response tokens, 0 elsewhere.

    Args:
        placed: ``(B, L)`` task rewards on tokens (from :func:`place_segment_rewards` or
            :func:`place_sequence_reward`).
        logprobs: ``(B, L)`` rollout log-probs of the sampled tokens under the policy.
        ref_logprobs: ``(B, L)`` same under the reference policy.
        mask: ``(B, L)`` response-token mask.
        kl_coef: ``beta >= 0``.
        kind: KL estimator, see :func:`kl_penalty`.

    Returns:
        ``(rewards, kl)``, both ``(B, L)``, detached, 0 outside ``mask``; ``kl`` is the unscaled
        per-token estimate (log ``kl.sum(1)`` per response to watch the drift).
    """
    shape = _check_same(placed=placed, logprobs=logprobs, ref_logprobs=ref_logprobs)
    m = _bool_mask(mask, shape)
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    kl = _zero_pad(kl_penalty(logprobs.detach(), ref_logprobs.detach(), kind), m)
    rewards = _zero_pad(placed.detach(), m) - kl_coef * kl
    return rewards, kl


# ---------------------------------------------------------------------------------------------
# advantages


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 1.0
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response (Schulman et al. 2016).

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, with ``V_{t+1}``
    and ``A_{t+1}`` taken as 0 after a response's last real token (the episode ends there; the
    value head's output on padding is never used). ``gamma = lam = 1`` gives
    ``A_t = sum_{s >= t} r_s - V_t``.

    Args:
        rewards: ``(B, L)`` per-token rewards (from :func:`token_rewards`).
        values: ``(B, L)`` rollout values ``V_t``.
        mask: ``(B, L)`` response-token mask, right-padded (checked).
        gamma: discount in ``[0, 1]`` (1.0 in Fine-Grained RLHF and FGAIF: responses are short).
        lam: GAE lambda in ``[0, 1]`` (1.0, as the released FGAIF and Fine-Grained RLHF code:
            ``A_t`` is the return from ``t`` minus ``V_t``; TRL's 0.95 trades bias for variance).

    Returns:
        ``(advantages, returns)``, both ``(B, L)``, ``returns = advantages + values``, 0 outside
        ``mask``, without gradient. Whiten the advantages (:func:`whiten`) before the policy loss;
        the value loss regresses on the unwhitened returns.
    """
    shape = _check_same(rewards=rewards, values=values)
    m = _bool_mask(mask, shape)
    _check_right_padded(m)
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    r = _zero_pad(rewards, m)
    v = _zero_pad(values, m)
    mf = m.to(v.dtype)
    length = shape[1]
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    for t in reversed(range(length)):
        # On padding r = v = 0 and the advantage is masked to 0, so at a row's last real token
        # V_{t+1} = A_{t+1} = 0: its recursion starts at its own end, whatever longer rows hold there.
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mf[:, t]
        advantages[:, t] = next_adv
        next_value = v[:, t]
    returns = _zero_pad(advantages + v, m)
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` over all masked entries of the batch: ``(x - mean) / sqrt(var + eps)``.

    The variance is the *unbiased* one (divided by ``n - 1``, ``n`` the number of masked
    entries), as TRL's ``masked_var`` (``unbiased=True``) used by its ``masked_whiten``, so the
    numbers match the common PPO recipes; with the thousands of tokens of a PPO batch the two
    differ negligibly. Fewer than 2 masked entries is an error (no variance).

    ``shift_mean=False`` adds the mean back, ``(x - mean) / std + mean``, as TRL does: unit variance
    but the original mean (Fine-Grained RLHF's ``whiten_rewards`` uses it on rewards, where the
    sign of the mean reward carries information).

    Args:
        x: ``(B, L)``.
        mask: ``(B, L)`` response-token mask.
        shift_mean: False to keep the mean.
        eps: added to the variance.

    Returns:
        ``(B, L)``, 0 outside ``mask``. Differentiable (usually called on constants).
    """
    shape = _check_same(x=x)
    m = _bool_mask(mask, shape)
    n = int(m.sum())
    if n < 2:
        raise ValueError(f"whiten needs at least 2 masked entries, got {n}")
    x0 = _zero_pad(x, m)
    mean = masked_mean(x0, m)
    var = _zero_pad((x0 - mean).square(), m).sum() / (n - 1)
    out = (x0 - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _zero_pad(out, m)


# ---------------------------------------------------------------------------------------------
# losses


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, as a loss to minimise (Schulman et al. 2017, eq. 7).

    ``rho = exp(logprobs - old_logprobs)``; ``loss = masked mean of max(-A rho, -A clip(rho, 1 - eps,
    1 + eps))``. Where the clipped term is the larger (``A > 0, rho > 1 + eps`` or ``A < 0, rho <
    1 - eps``) the token's gradient is 0: the update already moved it far enough.

    Args:
        logprobs: ``(B, L)`` log-probs of the rollout tokens under the current policy (with gradient).
        old_logprobs: ``(B, L)`` the same at rollout time (detached here).
        advantages: ``(B, L)`` advantages, usually whitened (detached here); positive = better.
        mask: ``(B, L)`` response-token mask.
        clip_range: ``eps > 0``.

    Returns:
        ``(loss, stats)``: ``loss`` a scalar with gradient; ``stats`` detached scalars:
        ``clip_fraction`` (share of masked tokens where ``-A clip(rho) > -A rho``, i.e. the
        clipped term was taken and differs), ``approx_kl`` (masked mean of ``0.5 (logp - old)^2``,
        TRL's ``approxkl``; a second-order estimate of ``KL(old || new)``, >= 0), ``ratio_mean``
        (masked mean of ``rho``).
    """
    shape = _check_same(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    m = _bool_mask(mask, shape)
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    adv = _zero_pad(advantages.detach(), m)
    # The log-ratio is zeroed on padding before exp: garbage there must not overflow (inf * 0 = NaN).
    log_ratio = _zero_pad(logprobs - old_logprobs.detach(), m)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), m),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range_value: float | None = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The value head's regression on the GAE returns, optionally clipped around the rollout values.

    ``loss = 0.5 * masked mean of max((V - R)^2, (V_clip - R)^2)``, ``V_clip = old + clamp(V - old,
    -c, c)``; with ``clip_range_value=None``, ``0.5 * masked mean of (V - R)^2``. The max makes the
    clip pessimistic: a value that moved more than ``c`` gets no gradient when moving further
    helps. (Clipping is in the value's units: scale ``c`` to the rewards' scale.)

    Args:
        values: ``(B, L)`` current value-head outputs (with gradient).
        old_values: ``(B, L)`` the rollout values (detached here).
        returns: ``(B, L)`` GAE returns (detached here).
        mask: ``(B, L)`` response-token mask.
        clip_range_value: ``c > 0``, or None for no clipping.

    Returns:
        ``(loss, stats)``: ``loss`` a scalar with gradient; ``stats`` detached scalars:
        ``value_clip_fraction`` (share of masked tokens where the clipped error is the larger;
        0 when unclipped) and ``explained_variance`` (``1 - Var(R - V) / Var(R)`` over the masked
        tokens, population variances; 1 is a perfect fit, <= 0 no better than a constant; NaN
        when the returns are constant).
    """
    shape = _check_same(values=values, old_values=old_values, returns=returns)
    m = _bool_mask(mask, shape)
    if clip_range_value is not None and clip_range_value <= 0:
        raise ValueError(f"clip_range_value must be > 0 or None, got {clip_range_value}")
    ret = _zero_pad(returns.detach(), m)
    v = _zero_pad(values, m)
    err = (v - ret).square()
    if clip_range_value is None:
        per_token = err
        clip_fraction = torch.zeros((), dtype=err.dtype, device=err.device)
    else:
        old = _zero_pad(old_values.detach(), m)
        v_clipped = old + (v - old).clamp(-clip_range_value, clip_range_value)
        err_clipped = (v_clipped - ret).square()
        per_token = torch.maximum(err, err_clipped)
        clip_fraction = masked_mean((err_clipped > err).to(err.dtype), m)
    loss = 0.5 * masked_mean(per_token, m)
    with torch.no_grad():
        var_ret = masked_mean((ret - masked_mean(ret, m)).square(), m)
        resid = ret - v
        var_resid = masked_mean((resid - masked_mean(resid, m)).square(), m)
        explained = 1.0 - var_resid / var_ret if bool(var_ret > 0) else torch.full_like(var_ret, float("nan"))
    return loss, {"value_clip_fraction": clip_fraction.detach(), "explained_variance": explained.detach()}


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the next-token distribution over the response tokens.

    ``H_t = -sum_v p_v log p_v`` with ``log p = log_softmax(logits)`` (computed in float32 at
    least); entries with ``p = 0`` (``-inf`` logits, e.g. a masked vocabulary) contribute 0 and give
    no NaN gradient.

    Args:
        logits: ``(B, L, V)`` the policy's logits at the response positions (aligned with ``mask``:
            ``logits[b, t]`` is the distribution token ``t`` was sampled from).
        mask: ``(B, L)`` response-token mask.

    Returns:
        Scalar masked mean of ``H_t`` (0 when nothing is masked in), differentiable (an entropy bonus
        subtracts ``coef * masked_entropy``).
    """
    if logits.ndim != 3:
        raise ValueError(f"expected logits (B, L, V), got {tuple(logits.shape)}")
    m = _bool_mask(mask, tuple(logits.shape[:2]))
    logp = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    # p * log p at p = 0 is 0 * -inf = NaN, and would make NaN gradients even under a where():
    # replace the -inf log-probs by 0 first (their p is exactly 0).
    safe_logp = logp.masked_fill(torch.isneginf(logp), 0.0)
    entropy = -(logp.exp() * safe_logp).sum(-1)                                             # (B, L)
    return masked_mean(_zero_pad(entropy, m), m)
