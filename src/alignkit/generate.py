"""Generating assistant replies with a chat template, stopping at the end-of-turn token."""

from __future__ import annotations

from typing import Any

import torch

from alignkit.chat_templates import ChatTemplate, render
from alignkit.config import GenerationConfig
from alignkit.data.formats import Message


def generation_kwargs(cfg: GenerationConfig, stop_ids: list[int], pad_id: int) -> dict[str, Any]:
    """transformers `generate` arguments for a config; temperature 0 means greedy."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": cfg.max_new_tokens,
        "eos_token_id": stop_ids,
        "pad_token_id": pad_id,
        "repetition_penalty": cfg.repetition_penalty,
        "do_sample": cfg.temperature > 0,
    }
    if cfg.temperature > 0:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
    return kwargs


def stop_token_ids(template: ChatTemplate, tokenizer: Any) -> list[int]:
    ids = {tokenizer.convert_tokens_to_ids(template.end_of_turn)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def prompt_ids(messages: list[Message], template: ChatTemplate, tokenizer: Any) -> list[int]:
    """Token ids of a conversation rendered up to the assistant's next turn."""
    prompt = render(messages, template, tokenizer, add_generation_prompt=True)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def generate_ids(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    ids: list[int],
    cfg: GenerationConfig,
    streamer: Any = None,
    stopping_criteria: list[Any] | None = None,
) -> torch.Tensor:
    """The new token ids after `ids`, stopping at the template's end-of-turn token."""
    kwargs = generation_kwargs(cfg, stop_token_ids(template, tokenizer), tokenizer.pad_token_id)
    if stopping_criteria:
        kwargs["stopping_criteria"] = stopping_criteria
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    torch.manual_seed(cfg.seed)
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs
    )
    return out[0, len(ids) :]


def generate_reply(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    messages: list[Message],
    cfg: GenerationConfig,
    streamer: Any = None,
) -> str:
    """The assistant's next message for a conversation (special tokens removed)."""
    ids = prompt_ids(messages, template, tokenizer)
    out = generate_ids(model, tokenizer, template, ids, cfg, streamer)
    return tokenizer.decode(out, skip_special_tokens=True).strip()
