"""MM-RLHF's critique reward model and the scalar Bradley-Terry baseline at use time.

The score head, the conversation a reward model reads (:func:`reward_messages`), the export format
(``reward_head.safetensors`` + ``reward_config.json`` beside the policy in Hugging Face format),
loading it back (:func:`load_reward_model`) and scoring (:class:`RewardScorer`: a critique model
first writes its critique, greedily by default, then one forward over prompt + critique reads the
score at the critique's end; with ``num_critic > 1`` it samples that many critiques and averages
the scores read after each, as MM-RLHF's ``llava/eval/eval_mm_reward_bench.py`` does with its
``--num_critic`` option, default 1, temperature 0). Training, the objective and what was checked in MM-RLHF's released code are in
:mod:`mmalign.methods.reward`.
"""

from __future__ import annotations

import json
import math
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from mmalign.collators import VisionChatCollator, to_device
from mmalign.losses.reward import gather_at, last_label_index
from mmalign.policy import Policy
from mmalign.records import load_image, message_text
from mmalign.rewards import prompt_messages

RewardMode = Literal["critique", "scalar"]
HeadKind = Literal["linear", "mlp"]

#: The tiny world's critique instruction (its tokenizer was trained on the world's own text).
CRITIQUE_PROMPT = "Question: {question}\nAnswer: {answer}\nCritique the answer."
#: MM-RLHF's evaluator prompt, verbatim from ``make_conv_rm`` (train_dpo.py, eval_mm_reward_bench.py).
MMRLHF_CRITIQUE_PROMPT = (
    "You are an unbiased and fair evaluator tasked with assessing the quality of answers provided by a Large "
    "Multimodal Model (LMM). Given the following question and the LMM's response, please evaluate the correctness, "
    "clarity, and completeness of the answer. Provide a detailed explanation of your assessment, including specific "
    "points of strength and areas for improvement.\n\n[Question]: {question}\n[LMM Response]: {answer}\n\n[Evaluation]:")
HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"
FORMAT_VERSION = 1
#: No truncation where every row must be kept (scoring): a sequence this long is never cut.
NO_LIMIT = 1 << 20


def check_critique_prompt(template: str) -> str:
    """``template`` if it names exactly the fields ``{question}`` and ``{answer}`` (each once or
    more) and no other; a ValueError naming what is wrong otherwise."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"critique_prompt {template!r} is not a format string: {e}") from None
    if fields != {"question", "answer"}:
        raise ValueError(f"critique_prompt must use the fields {{question}} and {{answer}} and no others; "
                         f"it has {sorted(fields)}")
    return template


# ---------------------------------------------------------------------------------------------
# the score head


class ScoreHead(nn.Module):
    """Hidden state ``(N, H)`` -> score ``(N,)``.

    Args:
        hidden_size: ``H``.
        kind: "linear" = one ``Linear(H, 1)``; "mlp" = MM-RLHF's ``RewardHead``: dropout,
            ``Linear(H, H)``, tanh, dropout, ``Linear(H, 1)``.
        dropout: dropout probability of the "mlp" head (MM-RLHF uses the model's attention dropout).

    The output layer starts with weights ~ N(0, 1 / (H + 1)) and bias 0 (Stiennon et al. 2020,
    "Learning to summarize from human feedback"), so initial scores have unit-order spread.
    """

    def __init__(self, hidden_size: int, kind: HeadKind = "linear", dropout: float = 0.0):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', not {kind!r}")
        self.kind = kind
        if kind == "mlp":
            self.dropout = nn.Dropout(dropout)
            self.dense = nn.Linear(hidden_size, hidden_size)
            self.out_proj = nn.Linear(hidden_size, 1)
            out = self.out_proj
        else:
            self.score = nn.Linear(hidden_size, 1)
            out = self.score
        nn.init.normal_(out.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(out.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            x = torch.tanh(self.dense(self.dropout(hidden)))
            return self.out_proj(self.dropout(x)).squeeze(-1)
        return self.score(hidden).squeeze(-1)


def score_rows(policy: Policy, head: ScoreHead, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: the logits ``(N, T, V)`` and each row's score ``(N,)``, read by ``head`` from
    the last layer's hidden state at the row's last labelled token (:func:`last_label_index`)."""
    logits, hidden = policy.forward_hidden(batch)                     # (N, T, V), (N, T, H)
    index = last_label_index(batch["labels"]).to(hidden.device)       # (N,)
    h = gather_at(hidden, index)                                      # (N, H)
    return logits, head(h.to(next(head.parameters()).dtype))


# ---------------------------------------------------------------------------------------------
# examples


def question_text(prompt: Sequence[dict]) -> str:
    """The text of a prompt's user turns (image parts dropped), joined by newlines."""
    return "\n".join(message_text(m).strip() for m in prompt if m["role"] == "user").strip()


def _n_images(messages: Sequence[dict]) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")


def reward_messages(prompt: Sequence[dict], answer: str, mode: RewardMode, critique: str | None = None,
                    critique_prompt: str = CRITIQUE_PROMPT) -> list[dict]:
    """The conversation a reward model reads for one (prompt, answer).

    critique mode: the prompt's system turns, then one user turn holding the prompt's image parts
    and ``critique_prompt`` filled with the question (the user turns' text) and the answer; then,
    when ``critique`` is given, the assistant turn with it (training, and scoring). Without it the
    conversation ends with the user turn (generating the critique).

    scalar mode: the prompt as it is, then the assistant turn with the answer.
    """
    if mode == "scalar":
        return [*prompt, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    if mode != "critique":
        raise ValueError(f"mode must be 'critique' or 'scalar', not {mode!r}")
    text = critique_prompt.format(question=question_text(prompt), answer=answer.strip())
    user = {"role": "user", "content": [{"type": "image"}] * _n_images(prompt) + [{"type": "text", "text": text}]}
    msgs = [m for m in prompt if m["role"] == "system"] + [user]
    if critique is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": critique}]})
    return msgs


# ---------------------------------------------------------------------------------------------
# inference


class RewardModel(nn.Module):
    """A trained reward model: the policy, its score head and how it was trained to read.

    Attributes:
        policy: the vision-language model (any :class:`Policy`).
        head: the :class:`ScoreHead`.
        mode: "critique" or "scalar".
        critique_prompt: the critique instruction it was trained with.
        config: ``reward_config.json`` as read.
    """

    def __init__(self, policy: Policy, head: ScoreHead, mode: RewardMode, critique_prompt: str = CRITIQUE_PROMPT,
                 config: dict | None = None):
        super().__init__()
        self.policy, self.head = policy, head
        self.mode, self.critique_prompt = mode, check_critique_prompt(critique_prompt)
        self.config = dict(config or {})

    @property
    def processor(self) -> Any:
        return self.policy.processor

    def messages(self, prompt: Sequence[dict], answer: str, critique: str | None = None) -> list[dict]:
        return reward_messages(prompt, answer, self.mode, critique, self.critique_prompt)

    def forward(self, batch: dict) -> torch.Tensor:
        """Scores ``(N,)`` of a train-mode batch (labels on the assistant turn)."""
        return score_rows(self.policy, self.head, batch)[1]


def load_reward_model(path: str | Path, device: str | torch.device = "cpu", policy_class: str | None = None,
                      **policy_kwargs: Any) -> RewardModel:
    """Load an exported reward model (``RewardModule``'s ``export.dir``) in eval mode on ``device``.

    The policy is built by class path (``policy_class``, default: the one recorded in
    ``reward_config.json``, e.g. ``models.policy.HFPolicy``) as ``cls(path=path, **policy_kwargs)``,
    so ``mmalign`` never imports a model family.
    """
    from safetensors.torch import load_file

    from mmalign.components import load_component

    path = Path(path)
    cfg_file, head_file = path / CONFIG_FILE, path / HEAD_FILE
    for f in (cfg_file, head_file):
        if not f.is_file():
            raise FileNotFoundError(f"{path}: no {f.name}; is this a reward model export (RewardModule export.dir)?")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON: {e}") from None
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: format_version {cfg.get('format_version')!r}, expected {FORMAT_VERSION}")
    for key in ("mode", "head", "hidden_size", "critique_prompt", "policy_class"):
        if key not in cfg:
            raise ValueError(f"{cfg_file}: missing {key!r}")
    policy = load_component(policy_class or cfg["policy_class"], path=str(path), **policy_kwargs)
    hidden = getattr(policy, "hidden_size", cfg["hidden_size"])
    if hidden != cfg["hidden_size"]:
        raise ValueError(f"{path}: the head reads width {cfg['hidden_size']} but the model's hidden size is {hidden}")
    head = ScoreHead(cfg["hidden_size"], cfg["head"], cfg.get("head_dropout", 0.0))
    missing, unexpected = head.load_state_dict(load_file(str(head_file)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{head_file}: does not match a {cfg['head']!r} head (missing {missing}, unexpected {unexpected})")
    return RewardModel(policy, head, cfg["mode"], cfg["critique_prompt"], cfg).eval().to(device)


@dataclass
class RewardItem:
    """One (images, prompt, answer) to score.

    Attributes:
        images: image paths or decoded PIL images, one per image part of ``prompt``.
        prompt: the user messages (TRL format) or the question as a string (then one image part
            per image goes first).
        answer: the response to score.
        critique: for a critique model, score with this critique instead of generating one
            (MM-RLHF's ``use_gt_critic``: the reference critique gives the head's upper bound).
        id: for error messages.
    """

    images: list[Any]
    prompt: list[dict] | str
    answer: str
    critique: str | None = None
    id: str = ""

    def messages_prompt(self) -> list[dict]:
        return prompt_messages(self.prompt, len(self.images))


@dataclass
class Scored:
    """A :class:`RewardScorer` result: the score and, for a critique model, the critique it read
    (the first one, when several were sampled), every critique and the score read after each
    (``score`` is their mean)."""

    score: float
    critique: str | None = None
    critiques: list[str] | None = None
    critique_scores: list[float] | None = None


class RewardScorer:
    """Scores items with a :class:`RewardModel`, in batches.

    critique mode: the critiques are generated in left-padded batches (:class:`VisionChatCollator`
    in generate mode), then one forward over prompt + critique (right-padded, labels on the
    critique) reads each score at the critique's end. With ``num_critic = k > 1`` each item gets
    ``k`` sampled critiques (one ``generate`` call with ``num_return_sequences = k`` per batch) and
    its score is the mean of the ``k`` scores, MM-RLHF's ``--num_critic`` in
    ``llava/eval/eval_mm_reward_bench.py`` (``rewards.append(np.mean(critic_reward))``). scalar
    mode: one forward over prompt + answer. Items are batched in order of their text length (less
    padding, and generation stops sooner) and returned in input order. A non-finite score is an
    error naming the item.

    Args:
        model: the reward model (its device is where batches go).
        batch_size: items per generate call, rows per forward call.
        max_new_tokens: longest critique generated.
        progress: show tqdm progress bars (on stderr).
        num_critic: critiques per item, their scores averaged (1 = the release's default).
        temperature: 0 (default, the release's too) = greedy; > 0 samples with this temperature
            and ``top_p``. ``num_critic > 1`` needs ``temperature > 0``: greedy critiques are all
            the same, and averaging copies only costs time.
        top_p: nucleus sampling threshold in (0, 1] when sampling.
        seed: sampling seed; batch ``j`` of a call samples under ``seed + j`` in a forked RNG, so
            scores repeat for the same items and batch size, and the caller's RNG is untouched.
    """

    def __init__(self, model: RewardModel, batch_size: int = 16, max_new_tokens: int = 256, progress: bool = False,
                 num_critic: int = 1, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if num_critic < 1:
            raise ValueError(f"num_critic must be >= 1, got {num_critic}")
        if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        if num_critic > 1 and temperature == 0:
            raise ValueError(f"num_critic={num_critic} with temperature 0: greedy critiques are identical, so their "
                             "scores are too; sample them (temperature > 0) or use num_critic 1")
        self.model, self.batch_size, self.max_new_tokens, self.progress = model, batch_size, max_new_tokens, progress
        self.num_critic, self.temperature, self.top_p, self.seed = num_critic, temperature, top_p, seed
        self.generate_collator = VisionChatCollator(model.processor, max_length=NO_LIMIT, mode="generate",
                                                    on_overlength="error")
        self.score_collator = VisionChatCollator(model.processor, max_length=NO_LIMIT, mode="train", train_on="last",
                                                 on_overlength="error")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batches(self, items: Sequence[RewardItem], desc: str, key=None):
        from tqdm.auto import tqdm

        key = key or (lambda it: len(it.answer))
        order = sorted(range(len(items)), key=lambda i: key(items[i]))
        with tqdm(total=len(items), desc=desc, unit="item", disable=not self.progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                yield idx
                bar.update(len(idx))

    @staticmethod
    def _images(it: RewardItem) -> list[Image.Image]:
        return [im if isinstance(im, Image.Image) else load_image(im, it.id) for im in it.images]

    def _generation_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p, "num_return_sequences": self.num_critic}

    @torch.no_grad()
    def critique_samples(self, items: Sequence[RewardItem]) -> list[list[str]]:
        """``num_critic`` critiques of each item (critique mode only), in input order."""
        if self.model.mode != "critique":
            raise ValueError("a scalar reward model writes no critique")
        k = self.num_critic
        out: list[list[str]] = [[] for _ in items]
        was_training = self.model.training
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            for j, idx in enumerate(self._batches(items, "critiques")):
                exs = [{"images": self._images(items[i]), "meta": {"id": items[i].id},
                        "messages": self.model.messages(items[i].messages_prompt(), items[i].answer)} for i in idx]
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed + j)
                    texts = self.model.policy.generate(to_device(self.generate_collator(exs), self.device),
                                                       **self._generation_kwargs())
                # one greedy text per item, or k sampled ones per item, item-major (generate's order)
                per = 1 if self.temperature == 0 else k
                if len(texts) != per * len(idx):
                    raise RuntimeError(f"{type(self.model.policy).__name__}.generate returned {len(texts)} texts for "
                                       f"{len(idx)} prompts x {per}")
                for n, i in enumerate(idx):
                    out[i] = list(texts[n * per:(n + 1) * per])
        finally:
            self.model.train(was_training)
        return out

    def critiques(self, items: Sequence[RewardItem]) -> list[str]:
        """One critique of each item (the first of :meth:`critique_samples`), in input order."""
        return [c[0] for c in self.critique_samples(items)]

    @torch.no_grad()
    def critique_scores(self, items: Sequence[RewardItem],
                        critiques: Sequence[str | Sequence[str]] | None = None) -> list[list[float]]:
        """The score read after each critique of each item, in input order: ``critiques[i]`` is
        one critique or a list of them (or, when ``critiques`` is None, ``items[i].critique``);
        both missing is an error. A scalar model gives one score per item."""
        if self.model.mode == "critique":
            crit = list(critiques) if critiques is not None else [it.critique for it in items]
            if len(crit) != len(items):
                raise ValueError(f"{len(crit)} critiques for {len(items)} items")
            lists = [[c] if isinstance(c, str) else (list(c) if c is not None else []) for c in crit]
            missing = [items[i].id or str(i) for i, cs in enumerate(lists)
                       if not cs or not all(isinstance(c, str) for c in cs)]
            if missing:
                raise ValueError(f"no critique to score for item(s) {missing[:5]}: generate them with critiques()")
        else:
            lists = [[None] for _ in items]  # type: ignore[list-item]
        # one row per (item, critique); rows are batched and scored like items
        rows = [(i, c) for i, cs in enumerate(lists) for c in cs]
        keyed = [RewardItem(items[i].images, items[i].prompt, items[i].answer, c, items[i].id) for i, c in rows]
        flat: list[float] = [math.nan] * len(rows)
        was_training = self.model.training
        self.model.eval()
        try:
            for idx in self._batches(keyed, "scores", key=lambda it: len(it.answer) + len(it.critique or "")):
                exs = [{"images": self._images(keyed[r]), "meta": {"id": keyed[r].id},
                        "messages": self.model.messages(keyed[r].messages_prompt(), keyed[r].answer, keyed[r].critique)}
                       for r in idx]
                s = self.model(to_device(self.score_collator(exs), self.device)).float().cpu().tolist()
                for r, v in zip(idx, s):
                    flat[r] = v
        finally:
            self.model.train(was_training)
        bad = sorted({keyed[r].id or str(rows[r][0]) for r, v in enumerate(flat) if not math.isfinite(v)})
        if bad:
            raise ValueError(f"the reward model gave non-finite scores (NaN/inf) for {len(bad)} item(s), e.g. {bad[:5]}; "
                             "refusing to pass them on (a broken export, or overflow in low precision?)")
        out: list[list[float]] = [[] for _ in items]
        for (i, _), v in zip(rows, flat):
            out[i].append(v)
        return out

    def scores(self, items: Sequence[RewardItem], critiques: Sequence[str | Sequence[str]] | None = None) -> list[float]:
        """The score of each item, in input order: the mean of the scores read after its
        critique(s) (:meth:`critique_scores`; one critique, or several averaged)."""
        return [sum(v) / len(v) for v in self.critique_scores(items, critiques)]

    def __call__(self, items: Sequence[RewardItem], generate: bool = True) -> list[Scored]:
        """Score ``items``; a critique model first writes its ``num_critic`` critiques
        (``generate=True``) or uses the items' own (``generate=False``)."""
        if self.model.mode != "critique":
            return [Scored(v[0]) for v in self.critique_scores(items)]
        crit = self.critique_samples(items) if generate else [[it.critique] for it in items]
        per = self.critique_scores(items, crit)  # type: ignore[arg-type]
        return [Scored(sum(v) / len(v), cs[0], list(cs), v) for cs, v in zip(crit, per)]
