"""Faster lm-eval scoring: each shared context, and each prefix that contexts share,
computed once; generation without re-copying the KV cache at every step.

lm-eval's HF wrapper scores every (context, continuation) pair as one full sequence
and takes log-softmax over the vocabulary at every position. A 25-shot ARC item
thus runs its ~1,000-token context four times. Here each distinct context runs
once with a KV cache (asking the model for the last position's logits only), and
its continuations run together on copies of that cache, so the work per item is
one context plus a few short continuations. Contexts that share a long prefix (MMLU's
5-shot contexts share their subject's shots) run it once, then each only its own tokens
on a copy of its cache. Scores equal lm-eval's: the same log-probabilities of the same
tokens, and the same greedy check.

For generation, transformers' dynamic cache concatenates every layer's keys and values
with the new token at each step, copying the whole cache; at 1,000+ tokens that copy
costs more than the model. `GrowingLayer` writes into a buffer that doubles when full
and hands attention a view of the filled part: the same tensors, amortised O(1) copies.
On CPU, generation also runs in larger batches than scoring (decode steps are cheap per
extra row, and IFEval answers run to 1,280 tokens).
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm
from transformers.cache_utils import Cache, DynamicLayer

logger = logging.getLogger(__name__)
Request = tuple[tuple[str, str] | None, list[int], list[int]]
Prefix = tuple[int, Any]  # (tokens, the KV cache after them)
CPU_GENERATE_BATCH = 32
MIN_CAPACITY = 256
MIN_SHARED_PREFIX = 32  # tokens contexts must share for the shared part to run once


class GrowingLayer(DynamicLayer):
    """A dynamic cache layer whose keys/values live in a buffer that doubles when full."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
            self.length = 0
        end = self.length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            self.buffers = self._grown(key_states, value_states, end)
        for buffer, states in zip(self.buffers, (key_states, value_states), strict=True):
            buffer[..., self.length : end, :] = states
        self.length = end
        self.keys, self.values = (b[..., :end, :] for b in self.buffers)
        return self.keys, self.values

    def _grown(self, keys: torch.Tensor, values: torch.Tensor, needed: int) -> tuple:
        old = 0 if self.buffers is None else self.buffers[0].shape[-2]
        capacity = max(needed, 2 * old, MIN_CAPACITY)
        grown = []
        for states, filled in ((keys, self.keys), (values, self.values)):
            buffer = states.new_empty((*states.shape[:-2], capacity, states.shape[-1]))
            if self.length:
                buffer[..., : self.length, :] = filled
            grown.append(buffer)
        return tuple(grown)

    def _rebuffer_after(self, method: Any, *args: Any) -> None:
        """Batch and length edits (beam search, cropping) leave plain tensors; the next
        update copies them into a fresh buffer."""
        method(*args)
        if self.is_initialized:
            self.buffers, self.length = None, self.keys.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        self._rebuffer_after(super().crop, tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rebuffer_after(super().batch_repeat_interleave, repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rebuffer_after(super().batch_select_indices, indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rebuffer_after(super().reorder_cache, beam_idx)


def growing_cache_fits(model: Any) -> bool:
    """Models whose every layer uses full attention (no sliding window or linear layers)."""
    config = model.config
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return types == {"full_attention"} and not getattr(config, "sliding_window", None)


def cached_scoring_fits(model: Any) -> bool:
    """Models whose cache can be copied per choice: attention layers only (a linear-attention
    or recurrent layer keeps a state the cache cannot repeat per row)."""
    types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    return types <= {"full_attention", "sliding_attention"}


def common_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading tokens two sequences share."""
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def prefix_runs(contexts: list[tuple[int, ...]]) -> list[tuple[int, list[tuple[int, ...]]]]:
    """The contexts in sorted order, cut into runs with the prefix length they all share
    (and that leaves each at least one token of its own): MMLU's 5-shot contexts share
    their subject's shots. A run sharing fewer than MIN_SHARED_PREFIX tokens is one
    context with 0."""
    runs: list[tuple[int, list[tuple[int, ...]]]] = []
    for context in sorted(contexts):
        if runs:
            shared, members = runs[-1]
            bound = shared if len(members) > 1 else len(members[0]) - 1
            length = min(bound, common_length(members[0], context), len(context) - 1)
            if length >= MIN_SHARED_PREFIX:
                runs[-1] = (length, [*members, context])
                continue
        runs.append((0, [context]))
    return runs


@torch.no_grad()
def run_prefix(model: Any, tokens: tuple[int, ...]) -> Prefix:
    device = next(model.parameters()).device
    out = model(torch.tensor([tokens], device=device), use_cache=True, logits_to_keep=1)
    return len(tokens), out.past_key_values


@torch.no_grad()
def score_continuations(
    model: Any,
    context: list[int],
    continuations: list[list[int]],
    batch_size: int,
    shared: Prefix | None = None,
) -> list[tuple[float, bool]]:
    """Sum of log p(continuation | context) and whether greedy decoding would produce it.

    The context runs once (after a copy of the `shared` prefix's cache, when given: only
    its own tokens); its cache is copied for each batch of continuations, which run
    right-padded (padding after a causal sequence cannot affect it).
    """
    device = next(model.parameters()).device
    start, past = shared if shared is not None else (0, None)
    prefix = model(
        torch.tensor([context[start:]], device=device),
        past_key_values=copy.deepcopy(past) if past is not None else None,
        use_cache=True,
        logits_to_keep=1,
    )
    first = prefix.logits[0, -1].float().log_softmax(-1)
    first_greedy = int(first.argmax())
    scores = []
    for start in range(0, len(continuations), batch_size):
        chunk = continuations[start : start + batch_size]
        width = max(len(c) for c in chunk) - 1
        tails = None
        if width > 0:
            # each row feeds cont[:-1]; the padding repeats a real token id
            rows = [c[:-1] + [c[-1]] * (width + 1 - len(c)) for c in chunk]
            cache = copy.deepcopy(prefix.past_key_values)
            cache.batch_repeat_interleave(len(chunk))
            inputs = torch.tensor(rows, device=device)
            tails = model(inputs, past_key_values=cache, use_cache=True).logits.float()
            tails = tails.log_softmax(-1)
        for row, cont in enumerate(chunk):
            logp, greedy = float(first[cont[0]]), first_greedy == cont[0]
            if len(cont) > 1:
                steps = tails[row, : len(cont) - 1]
                targets = torch.tensor(cont[1:], device=device)
                logp += float(steps.gather(-1, targets[:, None]).sum())
                greedy = greedy and bool((steps.argmax(-1) == targets).all())
            scores.append((logp, greedy))
    return scores


def group_by_context(requests: list[Request], max_length: int) -> tuple[dict, list[int]]:
    """Request indices grouped by context; indices too long for the window go apart."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    too_long = []
    for i, (_, context, continuation) in enumerate(requests):
        if len(context) + len(continuation) > max_length + 1 or not context:
            too_long.append(i)
        else:
            groups[tuple(context)].append(i)
    return groups, too_long


class SharedContextLM(HFLM):
    """lm-eval's HFLM with context-sharing log-likelihoods and a growing generation cache."""

    generate_batch_size: int | None = None  # generation batch when it differs from scoring

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        scoring = self.batch_size_per_gpu
        if self.generate_batch_size:
            self.batch_size_per_gpu = self.generate_batch_size
        try:
            return super().generate_until(requests, disable_tqdm)
        finally:
            self.batch_size_per_gpu = scoring

    def _model_generate(self, context: Any, max_length: int, stop: list[str], **kwargs: Any) -> Any:
        if "past_key_values" not in kwargs and growing_cache_fits(self.model):
            kwargs["past_key_values"] = Cache(layer_class_to_replicate=GrowingLayer)
        return super()._model_generate(context, max_length, stop, **kwargs)

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        if self.backend != "causal" or not cached_scoring_fits(self.model):
            if self.backend == "causal":
                logger.warning(
                    "%s keeps linear-attention state: scored by lm-eval's own path",
                    type(self.model).__name__,
                )
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        groups, too_long = group_by_context(requests, self.max_length)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if too_long:  # truncated from the left: lm-eval's own path
            for i, answer in zip(
                too_long,
                super()._loglikelihood_tokens(
                    [requests[i] for i in too_long], disable_tqdm, override_bs
                ),
                strict=True,
            ):
                results[i] = answer
        size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 16)
        bar = tqdm(
            total=len(requests) - len(too_long),
            disable=disable_tqdm or self.rank != 0,
            desc="Scoring choices (shared context)",
        )
        for length, contexts in prefix_runs(list(groups)):
            shared = run_prefix(self.model, contexts[0][:length]) if length else None
            for context in contexts:
                indices = groups[context]
                answers = score_continuations(
                    self.model, list(context), [requests[i][2] for i in indices], size, shared
                )
                for i, answer in zip(indices, answers, strict=True):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(indices))
        bar.close()
        return results  # type: ignore[return-value]
