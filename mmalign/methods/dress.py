"""DRESS: conditional RL on natural-language feedback, with multi-turn refinement.

Chen et al. 2024, "DRESS: Instructing Large Vision-Language Models to Align and Interact with
Humans via Natural Language Feedback" (CVPR). Feedback in natural language is not differentiable;
DRESS "generalize[s] conditional reinforcement learning" and trains the model "to produce
corresponding responses conditioned on the NLF using language modeling loss on the responses"
(project page). Two kinds of records (``make nlf``, :mod:`data_pipelines.nlf`):

* **critique** examples: (image, condition c(r) + question) -> response r, where the condition is
  the level of r's feedback rating (:class:`mmalign.conditions.ConditionScheme`: e.g. "Answer
  quality: good." / "... bad.");
* **refinement** episodes: (image, question) -> r_1, then (condition c(r_2) + refinement feedback)
  -> r_2: the loss is on the revision only, kept whether the revision fixed anything or not,
  labelled by its own condition.

With ``lp_b`` the per-token log-probs of example ``b``'s last assistant turn (the response, or the
revision), ``n_b`` its token count and ``w_b = kind_weights[kind_b]``:

    NLL_b = -(1 / n_b) * sum_t lp_b[t]
    loss  = sum_b w_b * NLL_b / sum_b w_b

At inference the model is asked with the best condition (``ConditionScheme.best()``); the export
writes the scheme beside the model (``dress_condition.json``), so ``mmalign eval`` and the
refinement benchmark ask exactly that.

What the released sources fix and what is ours: the released NLF data (LVLM_NLF) gives every model
turn a ``rating`` and a critique, and multi-turn episodes with the refinement feedback as the next
user turn; how a rating becomes the condition, and the loss weights, are not in the sources we
could read: thresholds, names, template and ``kind_weights`` are config fields (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mmalign.conditions import CONDITION_FILE, ConditionScheme
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
        condition_thresholds: ascending score cut points in [0, 1] (the data stage's ``--thresholds``).
        condition_names: one name per level, worst first; the last is the inference condition.
        condition_template: the condition text, with ``{name}``.
        kind_weights: loss weight per record kind ("critique", "refinement").

    The data are SFT records (``make nlf``) read with ``train_on: last``; every record's
    ``condition`` must be one of this scheme's texts (a record made with another scheme is an
    error naming it). ``optim`` defaults to lr 1e-4, warm-up 20 steps; the export option is
    :class:`~mmalign.methods.base.PolicyModule`'s (``**kwargs``).
    """

    def __init__(self, policy: Policy, condition_thresholds: Sequence[float] = (0.75,),
                 condition_names: Sequence[str] = ("bad", "good"),
                 condition_template: str = "Answer quality: {name}.",
                 kind_weights: dict[str, float] | None = None,
                 optim: OptimArgs = OptimArgs(lr=1e-4, warmup_steps=20), **kwargs):  # noqa: B008
        scheme = ConditionScheme(tuple(condition_thresholds), tuple(condition_names), condition_template)
        weights = {"critique": 1.0, "refinement": 1.0} if kind_weights is None else dict(kind_weights)
        unknown = set(weights) - set(KINDS)
        if unknown:
            raise ValueError(f"kind_weights: unknown kind(s) {sorted(unknown)}; kinds are {list(KINDS)}")
        for k, v in weights.items():
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"kind_weights[{k}] must be a finite number >= 0, got {v}")
        super().__init__(policy, loss_normalization="example", optim=optim, **kwargs)
        self.scheme = scheme
        self.kind_weights = {k: weights.get(k, 0.0) for k in KINDS}
        self._texts = {self.scheme.text(n) for n in self.scheme.names}

    def _weights(self, meta: list[dict]) -> torch.Tensor:
        out = []
        for m in meta:
            kind, cond = m.get("kind"), m.get("condition")
            where = record_where(m)
            if kind not in KINDS:
                raise RecordError(f"{where}: record kind {kind!r} is not one of {list(KINDS)} (make nlf writes them)")
            if cond not in self._texts:
                raise RecordError(f"{where}: condition {cond!r} is not one of this scheme's {sorted(self._texts)}; "
                                  "the data were made with another condition scheme")
            out.append(self.kind_weights[kind])
        return torch.tensor(out)

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
        # the scheme goes with the model: evaluation asks it with the best condition
        export_policy(self.policy, out_dir, self.export_args.merge_lora, config=self.scheme.to_dict(),
                      config_file=CONDITION_FILE, what="dress")
