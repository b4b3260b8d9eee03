"""FGAIF: PPO with fine-grained, segment-level rewards from three hallucination reward models.

Jing & Du 2024, "FGAIF: Aligning Large Vision-Language Models with Fine-grained AI Feedback"
(arXiv:2404.05046), after Fine-Grained RLHF (Wu et al. 2023, arXiv:2306.01693). One PPO
iteration (one ``training_step``) over a batch of prompts:

1. **Rollout.** The policy samples ``samples_per_prompt`` responses per prompt (batched, KV cache;
   :meth:`Policy.generate_ids` returns the sampled token ids, so training sees exactly them).
2. **Fine-grained rewards.** Each response is cut into sub-sentence segments
   (:func:`mmalign.segments.split_segments` with ``segmentation``: by default the released
   splitter, spaCy sentences then a cut after ``, ; ! ?`` only between pieces of at least five
   words; every reward model must have been trained on the same segmentation). Each reward model ``k`` (object existence,
   attribute, relation; :mod:`mmalign.methods.fg_reward`) classifies every segment as
   hallucinated / correct / n/a; ``R_k(j)`` is -1 / +1 / 0 ("label", the discrete reward) or the
   expectation of those values under the model's probabilities ("expected").
3. **Token rewards** (FGAIF eq.; Fine-Grained RLHF eq. 1)::

       r_t = sum_j 1(t = T_j) * sum_k w_k R_k(j)  -  kl_coef * KL_t,     KL_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)

   with ``T_j`` the last policy token of segment ``j``. ``reward_placement: sequence`` is the
   paper's sparse ablation: the same total ``sum_j sum_k w_k R_k(j)`` on the response's last token.
   ``reward_aggregation: mean`` (not in the paper) divides a response's segment rewards by its
   number of segments, so the total no longer grows with the number of correct segments.
4. **Advantages.** Values ``V_t`` from a value head; GAE (``gamma`` = ``lam`` = 1 by default, as
   the release); advantages whitened over the rollout.
5. **PPO.** ``ppo_epochs`` passes over the rollout in shuffled minibatches: clipped policy loss,
   clipped value loss (weight ``vf_coef``), gradient-norm clipping, one optimiser step each.

What the released code fixes and we follow (github.com/LiqiangJing/FGAIF,
``RLHF/scripts/7b-v1.5-224/train_fgrl_model.sh``): KL coefficient 0.1, 2 PPO epochs per rollout,
gradient norm 1.0, temperature 1.0, GAE ``gamma`` = ``lam`` = 1.0, value-loss weight 0.1, rewards
not whitened, one rollout batch per step, and Fine-Grained RLHF's sub-sentence splitter
(``RLHF/data_utils/segment.py``; ``segmentation: released``). Its value model is initialised from
a reward model (``init_value_with_reward``): ``value_init: reward_model`` loads the object reward
model's backbone into the separate value model (the value head starts at zero either way); the
default ``value_init: policy`` starts it from the policy, and ``value_model: shared`` puts the head
on the policy's own hidden states. The release's label codes are +1 = hallucinated, 0 = clean,
-1 = not applicable (class index = code + 1); here labels are named (:data:`mmalign.rewards.CLASSES`)
and rewarded through :data:`mmalign.rewards.VALUES` (hallucinated -1, n/a 0, correct +1).

What the released trainer (shipped as bytecode only, ``RLHF/models/__pycache__/fg_ppo_trainer*.pyc``)
does and this module deliberately does not copy: it *adds* ``+beta * (log pi - log pi_ref)`` to the
rewards, which rewards drifting away from the reference (a sign error; here the KL is subtracted,
Fine-Grained RLHF eq. 1); it multiplies the rewards by 10 when they are not whitened (here they are
used as they are); and it sums the three types' rewards unweighted, its per-type weight flags
never being read (here ``reward_weights`` are applied; equal by default, as the paper gives no
values).

Every formula is a pure function in :mod:`mmalign.losses.ppo` with hand-derived tests; this module
only wires them to the models. ``trainer.max_steps`` counts *optimiser* steps (one per minibatch):
a PPO iteration makes ``ppo_epochs * ceil(rollout / minibatch_size)`` of them.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mmalign.collators import select_rows
from mmalign.feedback import HALLUCINATION_TYPES
from mmalign.health import collapsed, generation_health
from mmalign.losses.ppo import (
    aggregate_segment_rewards,
    combine_type_rewards,
    gae,
    masked_entropy,
    place_segment_rewards,
    place_sequence_reward,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
    whiten,
)
from mmalign.methods.base import OptimArgs, PolicyModule
from mmalign.ops import gather_logprobs
from mmalign.policy import Policy
from mmalign.rewards import RewardForm, SegmentItem, SegmentRewardModel
from mmalign.segments import (
    DEFAULT_SEGMENTATION,
    check_same_segmentation,
    check_segmentation,
    split_segments,
)

log = logging.getLogger(__name__)
# Lightning warns that a manual-optimisation checkpoint holds the state *after* the optimiser
# steps; for PPO that is the consistent state (weights, optimiser, step count of a finished
# iteration), so the warning says nothing here.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

#: a reward_models entry that means "the scene-graph oracle's labels" (a control, synthetic world)
ORACLE = "oracle"
#: a reward_models entry ``judge:<checkpoint folder>``: that judge's verdicts, scored online
JUDGE_PREFIX = "judge:"
#: the class a ``judge:`` entry is loaded with (models/ is never imported by mmalign, only by path)
JUDGE_REWARDS_CLASS = "models.feedback_sources.JudgeSegmentRewards"
Placement = Literal["segment", "sequence"]
ValueModel = Literal["separate", "shared"]
ValueInit = Literal["policy", "reward_model"]


def token_char_ends(tokenizer, ids: list[int]) -> list[int]:
    """For each token of ``ids``, the length of ``tokenizer.decode(ids[:j + 1])`` (special
    tokens skipped): token ``j`` covers the decoded text up to that character. Decoding prefixes
    (not tokens one by one) is exact for byte-level and SentencePiece tokenizers alike, whose
    single-token decodes drop or merge spaces."""
    return [len(tokenizer.decode(ids[:j + 1], skip_special_tokens=True)) for j in range(len(ids))]


def segment_token_ends(text: str, char_ends: list[int],
                       segmentation: str = DEFAULT_SEGMENTATION) -> tuple[str, list[int]]:
    """The stripped response and, per segment of it (:func:`split_segments` with
    ``segmentation``), the index of the first token whose decoded prefix reaches the segment's
    last character (``text`` is the full decode of the tokens)."""
    lead = len(text) - len(text.lstrip())
    clean = text.strip()
    ends = []
    for seg in split_segments(clean, segmentation):
        target = lead + seg.end
        j = next((i for i, c in enumerate(char_ends) if c >= target), None)
        if j is None:
            raise ValueError(f"segment {seg.text!r} ends at character {target}, past the decoded tokens "
                             f"({char_ends[-1] if char_ends else 0} characters)")
        ends.append(j)
    return clean, ends


def _load_backbone_from_reward_model(backbone: Policy, path: str) -> None:
    """Load the backbone weights of the fine-grained reward model exported at ``path`` into
    ``backbone`` (a copy of the policy): same architecture and tokenizer, or a ValueError naming
    the folder. Only the weights move; the copy keeps the policy's freezing and adapters."""
    from mmalign.rewards.fine_grained import load_fg_reward_model

    rm = load_fg_reward_model(path)
    vocab = getattr(getattr(getattr(backbone, "processor", None), "tokenizer", None), "get_vocab", None)
    rm_vocab = getattr(getattr(getattr(rm.policy, "processor", None), "tokenizer", None), "get_vocab", None)
    if vocab is not None and rm_vocab is not None and vocab() != rm_vocab():
        raise ValueError(f"value_init='reward_model': {path} has another tokenizer than the policy; the value model "
                         "reads the policy's rollouts token by token")
    try:
        backbone.load_state_dict(rm.policy.state_dict(), strict=True)
    except RuntimeError as e:
        raise ValueError(f"value_init='reward_model': the backbone of {path} does not fit the policy's architecture "
                         f"(train the reward models from the same model as the policy): {e}") from None
    del rm


class FGAIFModule(PolicyModule):
    """PPO with fine-grained segment rewards (see the module docstring for every step).

    Args:
        reward_models: hallucination type -> exported fine-grained reward model folder
            (``make fg-rm``); a shared model's folder may be named for several types. Types:
            object, attribute, relation. ``oracle`` instead of a folder gives the scene-graph
            oracle's labels (synthetic world, scenes from the data module's ``data_root``): PPO
            with perfect fine-grained rewards, the control ``make fgaif-oracle`` runs.
            ``judge:<folder>`` gives that judge checkpoint's verdicts, scored online on every
            rollout (``models.feedback_sources.JudgeSegmentRewards``: the AI feedback itself as
            the reward, no reward model; ``make fgaif-judge``).
        reward_weights: ``w_k`` per type (equal by default: the paper's values were not found).
        reward_placement: "segment" (FGAIF: each segment's reward on its last token) or
            "sequence" (the ablation: the same total on the response's last token).
        reward_aggregation: "sum" (FGAIF: every segment's reward as it is) or "mean" (each
            divided by the response's number of segments: the total is the mean segment reward,
            length-neutral; not in the paper, see :func:`mmalign.losses.ppo.aggregate_segment_rewards`).
        reward_form: "label" (-1 hallucinated / 0 n/a / +1 correct, of the most probable class)
            or "expected" (those values weighed by the model's class probabilities).
        kl_coef: weight of the per-token KL penalty to the reference (FGAIF's script: 0.1).
        kl_estimator: "k1" (log-ratio, as Fine-Grained RLHF), "abs", "mse" or "k3".
        gamma: discount of GAE (1.0, as the release: rewards are already per-token).
        lam: GAE's lambda (1.0, as the release: advantages are the full Monte-Carlo returns minus
            the values).
        clip_range: PPO's policy ratio clip epsilon.
        clip_range_value: clip of the value update around the rollout's values; None = off.
        vf_coef: weight of the value loss (0.1, as the release).
        value_model: "separate" (its own backbone plus a head: the value loss never moves the
            policy) or "shared" (a head on the policy's hidden states; cheaper).
        value_init: where the separate value model's backbone starts: "policy" (a copy of the
            starting policy) or "reward_model" (the weights of a fine-grained reward model's
            backbone, as the release's ``init_value_with_reward``: the object model of
            ``reward_models``, else the first type's). Either way the value head starts at zero
            (the reward model's 3-class head has no scalar to carry over). "reward_model" needs
            ``value_model: separate``, a trained export (not "oracle") and the same tokenizer
            and architecture as the policy.
        segmentation: how rollouts are cut into rewarded segments (:mod:`mmalign.segments`:
            "released", the released FGAIF / Fine-Grained RLHF splitter and the default, or
            "fine"). Every reward model must have been trained on the same segmentation (its
            export's ``segmentation``); another is refused at set-up.
        value_lr: learning rate of the value model and head; None = ``optim.lr``.
        ppo_epochs: passes over each rollout (FGAIF's script: 2).
        minibatch_size: responses per optimiser step.
        samples_per_prompt: responses sampled per prompt of a rollout batch.
        max_new_tokens: longest response.
        temperature: sampling temperature of the rollouts.
        top_p: nucleus sampling of the rollouts (1.0 = off).
        whiten_rewards: whiten the token rewards before GAE (FGAIF: off).
        max_grad_norm: gradient-norm clip of every optimiser step; 0 = off.
        reward_batch_size: responses per reward-model forward.
        on_collapse: what to do when the rollouts' health (length, distinct-2, loops, empties)
            degrades against the first rollout (:func:`mmalign.health.collapsed`): "warn"
            or "stop".
        optim: the optimiser (:class:`~mmalign.methods.base.OptimArgs`; default lr 1e-5, no
            warm-up, ``min_lr_ratio`` 1.0: a constant learning rate).

    The export option is :class:`PolicyModule`'s (``**kwargs``); the export holds the policy only.
    """

    def __init__(self, policy: Policy, reward_models: dict[str, str],
                 reward_weights: dict[str, float] | None = None, reward_placement: Placement = "segment",
                 reward_form: RewardForm = "label", reward_aggregation: Literal["sum", "mean"] = "sum",
                 kl_coef: float = 0.1,
                 kl_estimator: Literal["k1", "abs", "mse", "k3"] = "k1", gamma: float = 1.0, lam: float = 1.0,
                 clip_range: float = 0.2, clip_range_value: float | None = 0.2, vf_coef: float = 0.1,
                 value_model: ValueModel = "separate", value_init: ValueInit = "policy",
                 segmentation: str = DEFAULT_SEGMENTATION, value_lr: float | None = None, ppo_epochs: int = 2,
                 minibatch_size: int = 8, samples_per_prompt: int = 1, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, whiten_rewards: bool = False,
                 max_grad_norm: float = 1.0, reward_batch_size: int = 32,
                 on_collapse: Literal["warn", "stop"] = "warn",
                 optim: OptimArgs = OptimArgs(lr=1e-5, warmup_steps=0, min_lr_ratio=1.0), **kwargs):  # noqa: B008
        if not reward_models:
            raise ValueError("reward_models is empty: name at least one of object / attribute / relation")
        unknown = set(reward_models) - set(HALLUCINATION_TYPES)
        if unknown:
            raise ValueError(f"reward_models: unknown type(s) {sorted(unknown)}; known: {list(HALLUCINATION_TYPES)}")
        weights = {k: 1.0 for k in reward_models} if reward_weights is None else dict(reward_weights)
        missing = set(reward_models) - set(weights)
        if missing:
            raise ValueError(f"reward_weights has no weight for {sorted(missing)}")
        for name, v in [("kl_coef", kl_coef), ("vf_coef", vf_coef), ("max_grad_norm", max_grad_norm),
                        *((f"reward_weights[{k}]", w) for k, w in weights.items())]:
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if reward_placement not in ("segment", "sequence"):
            raise ValueError(f"reward_placement must be 'segment' or 'sequence', not {reward_placement!r}")
        if reward_aggregation not in ("sum", "mean"):
            raise ValueError(f"reward_aggregation must be 'sum' or 'mean', not {reward_aggregation!r}")
        if reward_form not in ("label", "expected"):
            raise ValueError(f"reward_form must be 'label' or 'expected', not {reward_form!r}")
        if value_model not in ("separate", "shared"):
            raise ValueError(f"value_model must be 'separate' or 'shared', not {value_model!r}")
        if value_init not in ("policy", "reward_model"):
            raise ValueError(f"value_init must be 'policy' or 'reward_model', not {value_init!r}")
        if value_init == "reward_model" and value_model != "separate":
            raise ValueError("value_init='reward_model' starts a separate value model from a reward model's backbone: "
                             "it needs value_model='separate' (a shared head sits on the policy itself)")
        self.segmentation = check_segmentation(segmentation)
        if not 0 < clip_range < 1 or (clip_range_value is not None and clip_range_value <= 0):
            raise ValueError("clip_range must be in (0, 1) and clip_range_value > 0 (or None)")
        if not (0 <= gamma <= 1 and 0 <= lam <= 1):
            raise ValueError(f"gamma and lam must be in [0, 1], got {gamma}, {lam}")
        for name, v in (("ppo_epochs", ppo_epochs), ("minibatch_size", minibatch_size),
                        ("samples_per_prompt", samples_per_prompt), ("max_new_tokens", max_new_tokens)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        super().__init__(policy, optim=optim, **kwargs)
        self.automatic_optimization = False
        self.weights = weights
        hidden = getattr(policy, "hidden_size", None)
        if not isinstance(hidden, int):
            raise TypeError(f"{type(policy).__name__} has no integer `hidden_size`: the value head needs it")
        # The separate value model is a copy of the policy taken before any training (so it keeps
        # the policy's freezing, dtype and adapters); with value_init="reward_model" the reward
        # model's backbone weights are then loaded into it, as the release's init_value_with_reward.
        self.value_backbone = copy.deepcopy(policy) if value_model == "separate" else None
        if value_init == "reward_model":
            self.value_init_from = self._value_init_source(reward_models)
            _load_backbone_from_reward_model(self.value_backbone, self.value_init_from)
        else:
            self.value_init_from = None
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        # Reward models are frozen and large: kept out of the module tree (not in checkpoints,
        # not in the optimiser); loaded in setup().
        self.__dict__["_reward_models"] = None
        self._health_start: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []

    # -- set-up --------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)   # refuses an export the strategy cannot give
        # The reference must be the starting policy: snapshot it before Lightning restores a
        # checkpoint into the policy (restoring happens after setup()).
        snap = getattr(self.policy, "snapshot_reference", None)
        if snap is not None:
            snap()
        if self.__dict__["_reward_models"] is None:
            self.__dict__["_reward_models"] = self._load_reward_models()

    @staticmethod
    def _value_init_source(reward_models: dict[str, str]) -> str:
        """The reward model folder the value model starts from: the object model's, else the first."""
        kind = "object" if "object" in reward_models else next(iter(reward_models))
        path = reward_models[kind]
        if path == ORACLE or path.startswith(JUDGE_PREFIX):
            raise ValueError(f"value_init='reward_model': reward_models[{kind!r}] is {path!r}, which has no "
                             "reward-model backbone to start the value model from; use value_init='policy'")
        return path

    def _load_reward_models(self) -> dict[str, object]:
        from mmalign.rewards.fine_grained import load_fg_reward_model

        loaded: dict[str, object] = {}
        out = {}
        for kind, path in self.hparams.reward_models.items():
            if path not in loaded:
                loaded[path] = (self._oracle() if path == ORACLE else self._judge(path[len(JUDGE_PREFIX):])
                                if path.startswith(JUDGE_PREFIX) else load_fg_reward_model(path))
            model = loaded[path]
            if not isinstance(model, SegmentRewardModel):
                raise TypeError(f"reward model {path}: {type(model).__name__} does not implement "
                                "mmalign.rewards.SegmentRewardModel (types, segmentation, segment_rewards, to)")
            if kind not in model.types:
                raise ValueError(f"reward model {path} scores {list(model.types)}, not {kind!r}")
            # strict: a model trained on other segments would score positions it never saw
            check_same_segmentation(self.segmentation, model.segmentation, f"reward model {path} ({kind})")
            out[kind] = model
        return out

    def _oracle(self):
        """The scene-graph oracle as a perfect reward model (the control run): scenes from the
        data module's ``data_root``."""
        from mmalign.oracle import OracleSegmentRewards, load_world_scenes

        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        root = getattr(getattr(dm, "hparams", None), "data_root", None)
        if not root:
            raise ValueError("reward_models 'oracle' needs the data module's data_root (the synthetic world's "
                             "scene graphs)")
        return OracleSegmentRewards(load_world_scenes(root), segmentation=self.segmentation)

    def _judge(self, folder: str):
        """A judge checkpoint's verdicts as the rewards (``judge:<folder>``), segmented as the policy."""
        from mmalign.components import load_component

        if not folder or not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"reward_models 'judge:{folder}': no config.json there (a judge checkpoint "
                                    "folder, e.g. runs/demo/judge/model)")
        return load_component(JUDGE_REWARDS_CLASS, path=folder, segmentation=self.segmentation)

    def on_fit_start(self) -> None:
        for m in {id(m): m for m in self.__dict__["_reward_models"].values()}.values():
            m.to(self.device)

    def extra_parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        # the value head (and the separate value model) learn at value_lr
        hp = self.hparams
        params = list(self.value_head.parameters())
        if self.value_backbone is not None:
            params += list(self.value_backbone.trainable_parameters())
        return [(params, hp.value_lr if hp.value_lr is not None else self.optim.lr)]

    # -- rollout and rewards ---------------------------------------------------------------------

    def segment_rewards(self, meta: list[dict], texts: list[str]) -> dict[str, list[torch.Tensor]]:
        """Per type, per response, ``(S_i,)`` segment rewards ``R_k`` from the reward models."""
        items = [SegmentItem(images=m["image_paths"], prompt=m["prompt_messages"], response=t, id=str(m.get("id")))
                 for m, t in zip(meta, texts)]
        out: dict[str, list[torch.Tensor]] = {}
        done: dict[int, list[dict[str, torch.Tensor]]] = {}
        for kind, model in self.__dict__["_reward_models"].items():
            if id(model) not in done:
                done[id(model)] = model.segment_rewards(items, mode=self.hparams.reward_form,
                                                        batch_size=self.hparams.reward_batch_size)
            out[kind] = [r[kind].float() for r in done[id(model)]]
        return out

    def _values(self, prompt: dict, ids: torch.Tensor, mask: torch.Tensor,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        if self.value_backbone is not None:
            _, hidden = self.value_backbone.response_forward(prompt, ids, mask, hidden=True)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)          # (B, L)

    @staticmethod
    def _gather_logps(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return gather_logprobs(logits, ids) * mask

    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        """Sample, score and compute advantages for one batch of prompts (no gradients)."""
        hp = self.hparams
        t0 = time.perf_counter()
        k = hp.samples_per_prompt
        ids, mask = self.policy.generate_ids(batch, max_new_tokens=hp.max_new_tokens, do_sample=True,
                                             temperature=hp.temperature, top_p=hp.top_p, num_return_sequences=k)
        prompt = select_rows(batch, torch.arange(len(batch["meta"])).repeat_interleave(k))
        maskf = mask.float()
        t1 = time.perf_counter()

        tok = self.policy.processor.tokenizer
        texts, ends = [], []
        for row, n in zip(ids.tolist(), mask.sum(1).tolist()):
            full = tok.decode(row[:n], skip_special_tokens=True)
            clean, e = segment_token_ends(full, token_char_ends(tok, row[:n]), self.segmentation)
            texts.append(clean)
            ends.append(e)
        per_type = self.segment_rewards(prompt["meta"], texts)
        t2 = time.perf_counter()

        b, length = ids.shape
        s = max([len(e) for e in ends] + [1])
        end_index = torch.zeros(b, s, dtype=torch.long)
        valid = torch.zeros(b, s, dtype=torch.bool)
        for i, e in enumerate(ends):
            end_index[i, :len(e)] = torch.tensor(e, dtype=torch.long)
            valid[i, :len(e)] = True
        values = {}
        for kind, rows in per_type.items():
            v = torch.zeros(b, s)
            for i, r in enumerate(rows):
                if r.numel() != len(ends[i]):
                    raise ValueError(f"reward model for {kind} gave {r.numel()} segment rewards for a response with "
                                     f"{len(ends[i])} segments: {texts[i]!r}")
                v[i, :r.numel()] = r.cpu()
            values[kind] = v
        seg_total = aggregate_segment_rewards(combine_type_rewards(values, self.weights), valid,
                                              hp.reward_aggregation)                     # (B, S)
        if hp.reward_placement == "segment":
            placed = place_segment_rewards(end_index, seg_total, valid, length)
        else:
            placed = place_sequence_reward((seg_total * valid).sum(1), maskf.cpu())
        placed = placed.to(self.device)

        logits, hidden = self.policy.response_forward(prompt, ids, mask, hidden=self.value_backbone is None)
        old_logp = self._gather_logps(logits, ids, maskf)
        with self.policy.reference() as ref:
            ref_logits, _ = ref.response_forward(prompt, ids, mask)
        ref_logp = self._gather_logps(ref_logits, ids, maskf)
        old_values = self._values(prompt, ids, mask, hidden) * maskf
        rewards, kl = token_rewards(placed, old_logp, ref_logp, maskf, hp.kl_coef, hp.kl_estimator)
        if hp.whiten_rewards:
            rewards = whiten(rewards, maskf, shift_mean=False)
        adv, returns = gae(rewards, old_values, maskf, hp.gamma, hp.lam)
        adv = whiten(adv, maskf)
        t3 = time.perf_counter()

        n_seg = valid.sum().clamp(min=1)
        stats = {
            "reward/total": (placed.sum(1)).mean().item(),
            "reward/with_kl": (rewards.sum(1)).mean().item(),
            "kl": (kl * maskf).sum(1).mean().item(),
            "response_length": maskf.sum(1).mean().item(),
            "segments": valid.sum(1).float().mean().item(),
            "time/generation_s": t1 - t0,
            "time/scoring_s": t2 - t1,
            "time/prepare_s": t3 - t2,
            "rollout_tokens_per_s": maskf.sum().item() / max(t1 - t0, 1e-9),
        }
        for kind, v in values.items():
            stats[f"reward/{kind}"] = ((v * valid).sum() / n_seg).item()
            stats[f"hallucinated/{kind}"] = (((v < 0) & valid).sum() / n_seg).item()
        health = generation_health(texts)
        stats.update({f"health/{k}": v for k, v in health.items()})
        return {"prompt": prompt, "ids": ids, "mask": maskf, "old_logp": old_logp, "old_values": old_values,
                "adv": adv, "returns": returns, "texts": texts, "rewards_placed": placed, "stats": stats, "health": health}

    # -- the PPO step ----------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        ro = self.rollout(batch)
        t0 = time.perf_counter()
        opt = self.optimizers()
        sched = self.lr_schedulers()
        n = ro["ids"].shape[0]
        acc: dict[str, list[float]] = {}
        for _ in range(hp.ppo_epochs):
            for mb in torch.randperm(n).split(hp.minibatch_size):
                prompt = select_rows(ro["prompt"], mb)
                ids, m = ro["ids"][mb.to(self.device)], ro["mask"][mb.to(self.device)]
                logits, hidden = self.policy.response_forward(prompt, ids, m.long(), hidden=self.value_backbone is None)
                logp = self._gather_logps(logits, ids, m)
                values = self._values(prompt, ids, m.long(), hidden)
                idx = mb.to(self.device)
                pl, pstats = ppo_policy_loss(logp, ro["old_logp"][idx], ro["adv"][idx], m, hp.clip_range)
                vl, vstats = ppo_value_loss(values, ro["old_values"][idx], ro["returns"][idx], m,
                                            hp.clip_range_value)
                loss = pl + hp.vf_coef * vl
                opt.zero_grad()
                self.manual_backward(loss)
                if hp.max_grad_norm:
                    self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                sched.step()
                with torch.no_grad():
                    ent = masked_entropy(logits.detach(), m)
                for key, v in {"loss/policy": pl, "loss/value": vl, "entropy": ent, **pstats, **vstats}.items():
                    acc.setdefault(key, []).append(float(v.detach()) if torch.is_tensor(v) else float(v))
        stats = ro["stats"] | {k: sum(v) / len(v) for k, v in acc.items()}
        stats["time/training_s"] = time.perf_counter() - t0
        total = stats["time/generation_s"] + stats["time/scoring_s"] + stats["time/prepare_s"] + stats["time/training_s"]
        stats["time/step_s"] = total
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=n)
        self.log("train/reward", stats["reward/total"], prog_bar=True, batch_size=n)
        self.history.append({"step": self.global_step, **stats})
        if self._health_start is None:
            self._health_start = ro["health"]
        why = collapsed(ro["health"], self._health_start)
        if why:
            msg = f"rollout health degraded at optimiser step {self.global_step}: " + "; ".join(why) + \
                  f" | e.g. {ro['texts'][0][:120]!r}"
            log.warning(msg)
            if hp.on_collapse == "stop":
                print(msg + " -> stopping (on_collapse: stop)")
                self.trainer.should_stop = True
