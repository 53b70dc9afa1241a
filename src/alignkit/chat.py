"""`alignkit chat`: talk to a model through its chat template."""

from __future__ import annotations

from alignkit.chat_templates import resolve_template
from alignkit.config import Recipe
from alignkit.data.formats import Message
from alignkit.generate import generate_reply
from alignkit.models import load_model, load_tokenizer


def chat_once(recipe: Recipe, prompt: str, system: str | None = None) -> str:
    """Load the recipe's model and answer one user message."""
    tokenizer = load_tokenizer(recipe.model)
    template = resolve_template(recipe.model.chat_template, tokenizer)
    model = load_model(recipe.model).eval()
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return generate_reply(model, tokenizer, template, messages, recipe.generation)
