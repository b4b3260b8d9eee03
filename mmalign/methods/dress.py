"""DRESS: conditional RL on natural-language feedback, with multi-turn refinement.

Chen et al. 2024, "DRESS: Instructing Large Vision-Language Models to Align and Interact with
Humans via Natural Language Feedback" (CVPR). Feedback in natural language is not differentiable;
DRESS "generalize[s] conditional reinforcement learning" and trains the model "to produce
corresponding responses conditioned on the NLF using language modeling loss on the responses"
(project page). Two kinds of records (``make nlf``, :mod:`data_pipelines.nlf`):

* **critique** examples: (image, condition c(r) + question) -> response r;
* **refinement** episodes: (image, question) -> r_1, then (condition c(r_2) + refinement feedback)
  -> r_2: the loss is on the revision only, kept whether the revision fixed anything or not,
  labelled by its own condition (hindsight).

The condition ``c(r)`` (``condition``, :mod:`mmalign.conditions`):

* ``feedback`` (default; the paper's reading): r's critique text itself,
  ``feedback_template.format(feedback=critique)``, e.g. "Feedback: There is no cross in the
  image. The small red circle is correct." (for a revision: the oracle's critique of the
  revision). The condition text is in the prompt and carries no loss; the response's tokens do.
* ``rating``: the level of r's feedback score (:class:`~mmalign.conditions.ConditionScheme`:
  e.g. "Answer quality: good." / "... bad.").
* ``none``: no condition (:class:`~mmalign.conditions.NoCondition`), the *unconditioned
  ablation*: the same records (``make nlf`` with ``--condition none``: same responses,
  revisions, ids, kinds and weights, no condition text in any message) fitted with the same
  loss, i.e. plain SFT on the responses and revisions. Comparing it with a ``feedback`` (or
  ``rating``) model measures DRESS's claim that conditioning on the feedback helps: with
  ``none`` every response, good or bad, is learnt as an answer to the bare question, so any
  gain of the conditioned model over it is the condition's.

With ``lp_b`` the per-token log-probs of example ``b``'s last assistant turn (the response, or the
revision), ``n_b`` its token count and ``w_b = kind_weights[kind_b]``:

    NLL_b = -(1 / n_b) * sum_t lp_b[t]
    loss  = sum_b w_b * NLL_b / sum_b w_b

Inference asks for a good answer with the scheme's best condition, saved beside the exported
model (``dress_condition.json``), which ``mmalign eval`` and the refinement benchmark read
(:func:`mmalign.eval.cli.resolve_condition`). With ``none`` no file is written, so they ask the
model plainly, as any model trained without conditions. For ``rating`` that is the best level's text. For
``feedback`` it is the *good-feedback text*: ``good_feedback`` when the config gives one, else
derived when fitting starts from the training records' critique examples by
:func:`mmalign.conditions.derive_good_feedback` (the sentences that more than half of the
top-rated critiques share, in their usual order; with the world oracle's critiques "There is no
hallucination in the answer.", the verdict it writes for every answer without a false claim). The
data stage derives the same text from the same records into its ``condition.json``. Its limit:
critiques of correct answers in training also name what was correct ("The large red circle is
correct."), which inference cannot know, so the inference condition is shorter than the
training conditions of good answers.

What the released sources fix and what is ours: the released NLF data (LVLM_NLF) gives every model
turn a ``rating`` and a critique, and multi-turn episodes with the refinement feedback as the next
user turn; how the NLF is put in the prompt (template, placement), the good-feedback text asked at
inference, the rating alternative and the loss weights are not in the sources we could read: they
are config fields (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from mmalign.conditions import (
    CONDITION_FILE,
    CONDITION_MODES,
    ConditionScheme,
    FeedbackCondition,
    NoCondition,
    derive_good_feedback,
)
from mmalign.losses.dress import dress_loss, dress_loss_terms
from mmalign.methods.base import OptimArgs, export_policy, global_denominator
from mmalign.methods.sft import SFTModule
from mmalign.policy import Policy
from mmalign.records import RecordError
from mmalign.records import where as record_where

KINDS = ("critique", "refinement")


class DRESSModule(SFTModule):
    """Conditional RL on critique examples and refinement episodes (module docstring).

    Args:
        condition: "feedback" (condition on the critique text; default), "rating" (on the
            rating level) or "none" (no condition: the unconditioned ablation, which measures what
            conditioning adds; trained on records made with ``--condition none``, exported
            without ``dress_condition.json`` so evaluation asks it plainly).
        feedback_template: ``condition: feedback``: the condition text, with ``{feedback}`` (the
            data stage's ``--feedback-template``).
        good_feedback: ``condition: feedback``: the feedback text inference asks with; None
            derives it from the training records when fitting starts (module docstring).
        condition_thresholds: ``condition: rating``: ascending score cut points in [0, 1] (the
            data stage's ``--thresholds``).
        condition_names: ``condition: rating``: one name per level, worst first; the last is the
            inference condition.
        condition_template: ``condition: rating``: the condition text, with ``{name}``.
        kind_weights: loss weight per record kind ("critique", "refinement").

    The data are SFT records (``make nlf``) read with ``train_on: last``; every record's
    ``condition`` must be this scheme's text for it (feedback: the template filled with the
    record's ``critique``; rating: one of the levels' texts; none: null), so a record made with
    another scheme is an error naming it. ``optim`` defaults to lr 1e-4, warm-up 20 steps; the export
    option is :class:`~mmalign.methods.base.PolicyModule`'s (``**kwargs``).
    """

    def __init__(self, policy: Policy, condition: Literal["feedback", "rating", "none"] = "feedback",
                 feedback_template: str = "Feedback: {feedback}", good_feedback: str | None = None,
                 condition_thresholds: Sequence[float] = (0.75,),
                 condition_names: Sequence[str] = ("bad", "good"),
                 condition_template: str = "Answer quality: {name}.",
                 kind_weights: dict[str, float] | None = None,
                 optim: OptimArgs = OptimArgs(lr=1e-4, warmup_steps=20), **kwargs):  # noqa: B008
        if condition not in CONDITION_MODES:
            raise ValueError(f"condition must be one of {list(CONDITION_MODES)}, not {condition!r}")
        rating = ConditionScheme(tuple(condition_thresholds), tuple(condition_names), condition_template)
        feedback = FeedbackCondition(feedback_template, good_feedback)
        weights = {"critique": 1.0, "refinement": 1.0} if kind_weights is None else dict(kind_weights)
        unknown = set(weights) - set(KINDS)
        if unknown:
            raise ValueError(f"kind_weights: unknown kind(s) {sorted(unknown)}; kinds are {list(KINDS)}")
        for k, v in weights.items():
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"kind_weights[{k}] must be a finite number >= 0, got {v}")
        super().__init__(policy, loss_normalization="example", optim=optim, **kwargs)
        self.scheme: ConditionScheme | FeedbackCondition | NoCondition = (
            feedback if condition == "feedback" else NoCondition() if condition == "none" else rating)
        #: how the good-feedback text was found (derive_good_feedback's info), once fitting started
        self.good_feedback_info: dict | None = {"given": True} if good_feedback is not None else None
        self.kind_weights = {k: weights.get(k, 0.0) for k in KINDS}
        self._texts = {rating.text(n) for n in rating.names}

    def _expected(self, meta: dict) -> str:
        """The condition text a record must carry under this scheme (a RecordError when it has none)."""
        if isinstance(self.scheme, FeedbackCondition):
            try:
                return self.scheme.text(meta.get("critique"))
            except ValueError:
                raise RecordError(f"{record_where(meta)}: no critique text to condition on (condition: feedback); "
                                  "records made with --condition rating need condition: rating") from None
        return meta.get("condition") if meta.get("condition") in self._texts else None

    def _weights(self, meta: list[dict]) -> torch.Tensor:
        out = []
        for m in meta:
            kind, cond = m.get("kind"), m.get("condition")
            where = record_where(m)
            if kind not in KINDS:
                raise RecordError(f"{where}: record kind {kind!r} is not one of {list(KINDS)} (make nlf writes them)")
            if isinstance(self.scheme, NoCondition):
                if cond is not None:
                    raise RecordError(f"{where}: condition {cond!r}, but condition: none trains without any "
                                      "condition; the data were made with another condition scheme (the data "
                                      "stage's condition.json says which; make them with --condition none)")
            elif cond is None:
                raise RecordError(f"{where}: no condition, but condition: {self.scheme.mode} needs one; the data "
                                  "were made with another condition scheme (--condition none? the data stage's "
                                  "condition.json says which)")
            elif cond != self._expected(m):
                want = (f"the {self.scheme.mode} scheme's {self.scheme.template!r} of the record's critique"
                        if isinstance(self.scheme, FeedbackCondition) else
                        f"one of this scheme's {sorted(self._texts)}")
                raise RecordError(f"{where}: condition {cond!r} is not {want}; the data were made with another "
                                  f"condition scheme (the data stage's condition.json says which)")
            out.append(self.kind_weights[kind])
        return torch.tensor(out)

    def on_fit_start(self) -> None:
        if isinstance(self.scheme, FeedbackCondition) and self.scheme.good_feedback is None:
            records = getattr(getattr(self.trainer.datamodule, "train_set", None), "records", None)
            if records is None:
                raise ValueError("condition: feedback without good_feedback derives it from the training records, "
                                 "but the datamodule has no train_set.records; give model.good_feedback")
            self.set_good_feedback_from(records)

    def set_good_feedback_from(self, records) -> None:
        """Derive the good-feedback text from SFT records' critique examples (their meta ``score``
        and ``critique``; :func:`~mmalign.conditions.derive_good_feedback`)."""
        text, info = derive_good_feedback((r.meta.get("score"), r.meta.get("critique")) for r in records
                                          if r.meta.get("kind") == "critique")
        self.scheme = FeedbackCondition(self.scheme.template, text)
        self.good_feedback_info = info
        print(f"DRESS: inference asks with the good feedback {text!r} ({info['rule']} of "
              f"{info['top_examples']} top-rated critiques, score {info['top_score']:g})")

    def _step(self, batch: dict, stage: str):
        logps, mask = self.policy.completion_logprobs(batch)              # (B, T-1)
        w = self._weights(batch["meta"]).to(logps.device)
        weighted, total = dress_loss_terms(logps, mask, w)
        # Divided by the all-reduced weight total / world size: under data parallelism the
        # ranks' gradient average is the global batch's weighted mean, whatever weights each
        # rank drew (a no-op on one process). A zero global total gives weighted / tiny = 0.
        loss = weighted / global_denominator(total, min_total=1e-12)
        bs = len(batch["meta"])
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        with torch.no_grad():
            for kind in KINDS:
                sel = torch.tensor([m["kind"] == kind for m in batch["meta"]], device=logps.device)
                if sel.any():
                    self.log(f"{stage}/nll_{kind}", dress_loss(logps[sel], mask[sel], torch.ones(int(sel.sum()))),
                             batch_size=int(sel.sum()))
        return loss

    def export(self, out_dir: str) -> None:
        if isinstance(self.scheme, NoCondition):
            # no dress_condition.json: load_scheme then gives None and every reader (mmalign eval,
            # the refinement benchmark) asks the model plainly, as it was trained
            export_policy(self.policy, out_dir, self.export_args.merge_lora, what="dress")
            return
        # the scheme goes with the model: evaluation asks it with the best condition
        config = self.scheme.to_dict()
        if isinstance(self.scheme, FeedbackCondition):
            if self.scheme.good_feedback is None:
                raise ValueError("condition: feedback: no good-feedback text to export (fit first, or give "
                                 "model.good_feedback)")
            config["good_feedback_info"] = self.good_feedback_info
        export_policy(self.policy, out_dir, self.export_args.merge_lora, config=config,
                      config_file=CONDITION_FILE, what="dress")
