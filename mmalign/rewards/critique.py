"""MM-RLHF's critique reward model and the scalar Bradley-Terry baseline at use time.

The score head, the conversation a reward model reads (:func:`reward_messages`), the export format
(``reward_head.safetensors`` + ``reward_config.json`` beside the policy in Hugging Face format),
loading it back (:func:`load_reward_model`) and scoring (:class:`RewardScorer`: a critique model
first writes its critique greedily, then one forward over prompt + critique reads the score at the
critique's end). Training, the objective and what was checked in MM-RLHF's released code are in
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
    """A :class:`RewardScorer` result: the score and, for a critique model, the critique it read."""

    score: float
    critique: str | None = None


class RewardScorer:
    """Scores items with a :class:`RewardModel`, in batches.

    critique mode: the critiques are generated greedily in left-padded batches
    (:class:`VisionChatCollator` in generate mode), then one forward over prompt + critique
    (right-padded, labels on the critique) reads each score at the critique's end. scalar mode:
    one forward over prompt + answer. Items are batched in order of their text length (less
    padding, and generation stops sooner) and returned in input order. A non-finite score is an
    error naming the item.

    Args:
        model: the reward model (its device is where batches go).
        batch_size: rows per generate / forward call.
        max_new_tokens: longest critique generated.
        progress: show tqdm progress bars (on stderr).
    """

    def __init__(self, model: RewardModel, batch_size: int = 16, max_new_tokens: int = 256, progress: bool = False):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        self.model, self.batch_size, self.max_new_tokens, self.progress = model, batch_size, max_new_tokens, progress
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

    @torch.no_grad()
    def critiques(self, items: Sequence[RewardItem]) -> list[str]:
        """Greedy critiques of ``items`` (critique mode only), in input order."""
        if self.model.mode != "critique":
            raise ValueError("a scalar reward model writes no critique")
        out: list[str | None] = [None] * len(items)
        was_training = self.model.training
        self.model.eval()
        try:
            for idx in self._batches(items, "critiques"):
                exs = [{"images": self._images(items[i]), "meta": {"id": items[i].id},
                        "messages": self.model.messages(items[i].messages_prompt(), items[i].answer)} for i in idx]
                texts = self.model.policy.generate(to_device(self.generate_collator(exs), self.device),
                                                   max_new_tokens=self.max_new_tokens)
                for i, t in zip(idx, texts):
                    out[i] = t
        finally:
            self.model.train(was_training)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def scores(self, items: Sequence[RewardItem], critiques: Sequence[str] | None = None) -> list[float]:
        """The score of each item, in input order. Critique mode reads ``critiques[i]`` (or
        ``items[i].critique`` when ``critiques`` is None); both missing is an error."""
        if self.model.mode == "critique":
            crit = list(critiques) if critiques is not None else [it.critique for it in items]
            if len(crit) != len(items):
                raise ValueError(f"{len(crit)} critiques for {len(items)} items")
            missing = [items[i].id for i, c in enumerate(crit) if c is None]
            if missing:
                raise ValueError(f"no critique to score for item(s) {missing[:5]}: generate them with critiques()")
        else:
            crit = [None] * len(items)
        out: list[float] = [math.nan] * len(items)
        was_training = self.model.training
        self.model.eval()
        try:
            for idx in self._batches(items, "scores", key=lambda it: len(it.answer) + len(it.critique or "")):
                exs = [{"images": self._images(items[i]), "meta": {"id": items[i].id},
                        "messages": self.model.messages(items[i].messages_prompt(), items[i].answer, crit[i])}
                       for i in idx]
                s = self.model(to_device(self.score_collator(exs), self.device)).float().cpu().tolist()
                for i, v in zip(idx, s):
                    out[i] = v
        finally:
            self.model.train(was_training)
        bad = [items[i].id or str(i) for i, v in enumerate(out) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"the reward model gave non-finite scores (NaN/inf) for {len(bad)} item(s), e.g. {bad[:5]}; "
                             "refusing to pass them on (a broken export, or overflow in low precision?)")
        return out

    def __call__(self, items: Sequence[RewardItem], generate: bool = True) -> list[Scored]:
        """Score ``items``; a critique model first writes its critiques (``generate=True``) or uses
        the items' own (``generate=False``)."""
        crit: list[str | None]
        if self.model.mode == "critique":
            crit = list(self.critiques(items)) if generate else [it.critique for it in items]
            scores = self.scores(items, crit)  # type: ignore[arg-type]
        else:
            crit = [None] * len(items)
            scores = self.scores(items)
        return [Scored(s, c) for s, c in zip(scores, crit)]
