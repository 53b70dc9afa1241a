"""On-policy samples: k completions per prompt from the current policy, their exact
masks, their training batch, and online-DPO pairs.

A completion is the sampled tokens up to and including the first stop token (the
template's end of turn, or EOS); what `generate` pads after it is no part of it. A
completion that reached `max_completion_length` without a stop token is clipped.
Sampling draws from its own generator state, seeded from (seed, step): a resumed run
samples what the uninterrupted run sampled, and the global RNG is left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from alignkit.data.batching import (
    IGNORE,
    Segment,
    SequenceBatch,
    completion_segment,
    flat_batch_of,
    sequence_batch,
)
from alignkit.data.tokenize import TokenizedPair
from alignkit.serve.batch import left_pad


@dataclass
class Rollout:
    """One sampled completion of prompt `group` (k rollouts share a group)."""

    group: int
    prompt_ids: list[int]
    completion_ids: list[int]  # up to and including the stop token
    stopped: bool  # False: cut at max_completion_length (clipped)


@dataclass(frozen=True)
class SamplingSettings:
    k: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def trim_completion(ids: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """The ids up to and including the first stop token, and whether one was found."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[: i + 1], True
    return ids, False


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % 2**63


@torch.no_grad()
def sample_rollouts(
    model: Any,
    prompts: list[list[int]],
    settings: SamplingSettings,
    stop_ids: list[int],
    pad_id: int,
    seed: int,
) -> list[Rollout]:
    """k sampled completions per prompt, prompt by prompt (the k of one prompt adjacent),
    decoded as one left-padded batch with the KV cache; temperature 0 decodes greedily."""
    rows = [p for p in prompts for _ in range(settings.k)]
    ids, mask = left_pad(rows, pad_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sampling = {"do_sample": False}  # temperature 0: greedy
    if settings.temperature > 0:
        sampling = {
            "do_sample": True,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k or None,
        }
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            **sampling,
            max_new_tokens=settings.max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            use_cache=True,
        )
    model.train(was_training)
    new = out[:, ids.shape[1] :].tolist()
    stops = set(stop_ids)
    rollouts = []
    for i, (prompt, sampled) in enumerate(zip(rows, new, strict=True)):
        completion, stopped = trim_completion(sampled, stops)
        rollouts.append(Rollout(i // settings.k, prompt, completion, stopped))
    return rollouts


# ---------------------------------------------------------------- training batches


def group_segment(group: list[Rollout], first_slot: int) -> Segment:
    """[prompt[:-1] | prompt[-1] c_1 | prompt[-1] c_2 | ... ]: one block whose k branches
    share one copy of the prompt. Branch 1 is the block's causal head; branches 2..k are
    its tail, each seeing the shared part and itself (block-diagonal causal mask), their
    positions all continuing from the shared part's end."""
    prompt = group[0].prompt_ids
    if len(group) == 1:
        return completion_segment((prompt, group[0].completion_ids, None), first_slot)
    shared, last = prompt[:-1], prompt[-1]
    s = len(shared)
    ids, labels, owner, positions = list(shared), [IGNORE] * s, [-1] * s, list(range(s))
    lengths = []
    for slot, r in enumerate(group, start=first_slot):
        n = len(r.completion_ids) + 1
        ids += [last, *r.completion_ids]
        labels += [IGNORE, *r.completion_ids]
        owner += [-1] + [slot] * (n - 1)
        positions += list(range(s, s + n))
        lengths.append(n)
    second = s + lengths[0]
    tail = len(ids) - second
    mask = torch.zeros(tail, s + tail, dtype=torch.bool)
    mask[:, :s] = True
    start = 0
    for n in lengths[1:]:
        mask[start : start + n, s + start : s + start + n] = torch.tril(
            torch.ones(n, n, dtype=torch.bool)
        )
        start += n
    return Segment(ids, labels, owner, positions, s, second, mask)


def rollout_batch(
    rollouts: list[Rollout], pad_id: int, padding_free: bool, share_all: bool = False
) -> SequenceBatch:
    """Every completion scored in slot = its index. Padding-free: a prompt's completions
    as branches of blocks on a copy of the prompt (`group_segment`), all of them on one
    copy with `share_all`, else two per copy (the band of a sliding window is built for
    two branches, as preference pairs have). Not padding-free: one right-padded row per
    completion."""
    n = len(rollouts)
    if not padding_free:
        return sequence_batch([(r.prompt_ids, r.completion_ids, None) for r in rollouts], n, pad_id)
    starts = [i for i in range(n) if i == 0 or rollouts[i].group != rollouts[i - 1].group]
    width = n if share_all else 2
    segments = [
        group_segment(rollouts[i : min(i + width, end)], i)
        for start, end in zip(starts, [*starts[1:], n], strict=True)
        for i in range(start, end, width)
    ]
    return flat_batch_of(segments, n)


def per_completion(
    values: torch.Tensor, batch: SequenceBatch, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored-token values (in `token_logps` order) as [n, T] by completion, with the mask."""
    owners = batch.owner[:, 1:][batch.labels[:, 1:] != IGNORE]
    order = torch.sort(owners, stable=True).indices
    owners, values = owners[order], values[order]
    counts = torch.bincount(owners, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(len(owners), device=owners.device) - starts[owners]
    width = int(counts.max()) if n else 0
    padded = values.new_zeros(n, width).index_put((owners, positions), values)
    mask = torch.arange(width, device=owners.device)[None, :] < counts[:, None]
    return padded, mask


# ---------------------------------------------------------------- online DPO


def best_worst_pairs(
    rollouts: list[Rollout], rewards: list[float], k: int
) -> tuple[list[TokenizedPair], int]:
    """Per prompt, its best completion as chosen and its worst as rejected (the first of
    equals); a prompt whose k rewards are all equal gives no pair. Returns the pairs and
    the number of such tied prompts."""
    pairs, ties = [], 0
    for g in range(0, len(rollouts), k):
        scores = rewards[g : g + k]
        best = max(range(k), key=lambda i: scores[i])
        worst = min(range(k), key=lambda i: scores[i])
        if scores[best] == scores[worst]:
            ties += 1
            continue
        chosen, rejected = rollouts[g + best], rollouts[g + worst]
        pairs.append(
            TokenizedPair(chosen.prompt_ids, chosen.completion_ids, rejected.completion_ids)
        )
    return pairs, ties
