"""The policy protocol: what every method needs from a vision-language model.

``mmalign`` never imports a model family. Methods take a :class:`Policy`; the concrete adapter
(``models.policy.HFPolicy``) is named by ``class_path`` in the YAML config and is the only place
that knows a family's quirks (image-token expansion, ``pixel_values``, ``image_grid_thw``).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class Policy(nn.Module, abc.ABC):
    """A trainable image-text-to-text model plus its processor.

    Batches are the dicts built by :mod:`mmalign.collators`: model inputs (``input_ids``,
    ``attention_mask``, ``pixel_values`` and whatever else the processor returned), ``labels``
    for training batches, and ``meta`` (a list of per-example dicts, never sent to the model).
    """

    processor: Any

    @abc.abstractmethod
    def forward(self, batch: dict) -> torch.Tensor:
        """Logits ``(B, T, V)`` for a collated batch."""

    @abc.abstractmethod
    def completion_logprobs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the labelled (completion) tokens: ``(logps, mask)``, ``(B, T-1)``."""

    def forward_hidden(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, T, V)`` and the last layer's hidden states ``(B, T, H)`` in one forward
        pass (reward and value heads read the hidden states; the LM loss reads the logits)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose hidden states")

    def pair_logprobs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """Per-token log-probs of both completions of a preference batch
        (:class:`mmalign.collators.PreferenceCollator`): ``(chosen_logps, chosen_mask,
        rejected_logps, rejected_mask)``, each ``(B, T)``, 0 / mask 0 where not scored; a visual
        batch (``batch["visual"]``) adds ``(visual_logps, visual_mask)``: the chosen answer under
        the rejected images.

        The base implementation handles the ``"concat"`` layout (``2B`` full rows, chosen first)
        with :meth:`completion_logprobs`; adapters that can share the prompt's KV cache override
        it for ``"shared_prompt"``."""
        if batch.get("layout") != "concat":
            raise NotImplementedError(f"{type(self).__name__} only supports the 'concat' pair layout")
        return split_concat(*self.completion_logprobs(batch), visual=bool(batch.get("visual")))

    @abc.abstractmethod
    def generate(self, batch: dict, **generation_kwargs: Any) -> list[str]:
        """Decode completions for a left-padded prompt batch; returns the new text only."""

    def generate_ids(self, batch: dict, **generation_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`generate` but returns the new *token ids* ``(B', L)`` and their mask
        ``(B', L)`` (1 up to and including each row's first end-of-sequence token): RL trains on
        exactly the tokens it sampled, which re-tokenising decoded text would not give back."""
        raise NotImplementedError(f"{type(self).__name__} does not return generated token ids")

    def response_forward(self, prompt: dict, response_ids: torch.Tensor, response_mask: torch.Tensor,
                         hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward over each left-padded prompt of ``prompt`` (a generate-mode batch) followed
        by its response tokens: the logits that predict the response tokens ``(B, L, V)`` and, with
        ``hidden``, the last layer's hidden states at the response tokens ``(B, L, H)``."""
        raise NotImplementedError(f"{type(self).__name__} does not score prompt + response rows")

    @abc.abstractmethod
    def reference(self) -> contextlib.AbstractContextManager[Policy]:
        """Context in which calls go to the frozen reference model (adapter disabled under
        LoRA, else a frozen copy taken at the first call)."""

    @abc.abstractmethod
    def save_pretrained(self, out_dir: str, merge_lora: bool = True) -> None:
        """Write the policy in Hugging Face format so the next stage loads it by path."""

    @staticmethod
    def model_inputs(batch: dict) -> dict:
        """The entries of ``batch`` that go to the model (tensors except ``labels``)."""
        return {k: v for k, v in batch.items() if k not in ("labels", "meta") and isinstance(v, torch.Tensor)}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)


def split_concat(logps: torch.Tensor, mask: torch.Tensor, visual: bool = False) -> tuple[torch.Tensor, ...]:
    """``(kB, T)`` log-probs of a ``"concat"`` pair batch (chosen rows, then rejected rows, then,
    for a visual batch, chosen rows under the rejected images) -> ``(chosen_logps, chosen_mask,
    rejected_logps, rejected_mask[, visual_logps, visual_mask])``, each ``(B, T)``."""
    k = 3 if visual else 2
    b = logps.shape[0] // k
    out = []
    for j in range(k):
        out += [logps[j * b:(j + 1) * b], mask[j * b:(j + 1) * b]]
    return tuple(out)
