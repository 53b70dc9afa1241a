"""`alignkit serve`: an OpenAI-compatible HTTP API over one loaded model.

`schema` validates requests, `engine` holds a bounded, cancellable queue whose requests
`batch` decodes together (each with its own sampling and stops), `app` maps routes to it. Needs the `serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.serve.app import StopTrimmer, create_app
from alignkit.serve.engine import Engine, cut_at_stop

__all__ = ["Engine", "StopTrimmer", "create_app", "cut_at_stop", "load_engine", "serve"]
API_KEY_ENV = "ALIGNKIT_API_KEY"


def load_engine(
    recipe: Any, name: str | None = None, max_queue: int = 16, max_batch: int = 8
) -> Engine:
    from alignkit.chat_templates import generation_template
    from alignkit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    template = generation_template(recipe.model.chat_template, tokenizer, recipe.model.name_or_path)
    model = load_model(recipe.model).eval()
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    name = name or recipe.model.name_or_path
    return Engine(
        model, tokenizer, template, name, context, max_queue=max_queue, max_batch=max_batch
    )


def api_key(given: str | None, key_file: str | None) -> str | None:
    """The key from --api-key-file, --api-key or $ALIGNKIT_API_KEY (first found)."""
    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise AlignkitError(f"API key file '{key_file}' does not exist.")
        try:
            key = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise AlignkitError(f"API key file '{key_file}' is not UTF-8 text.") from None
        if not key:
            raise AlignkitError(f"API key file '{key_file}' is empty.")
        return key
    return given or os.environ.get(API_KEY_ENV) or None


def check_bindable(host: str, port: int) -> None:
    """The address can be listened on, checked before the model loads."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise AlignkitError(f"--host '{host}' is not an address here ({exc.strerror}).") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise AlignkitError(
                f"Cannot listen on {host}:{port} ({exc.strerror}). Choose another --port, or "
                "stop what is using it."
            ) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    recipe: Any,
    host: str,
    port: int,
    key: str | None,
    name: str | None,
    max_queue: int = 16,
    say: Any = print,
    max_batch: int = 8,
) -> None:
    import uvicorn

    if not is_loopback(host) and not key:
        say(
            f"warning: serving on {host} without an API key: anyone who can reach this port "
            f"can use the model. Set {API_KEY_ENV} or pass --api-key-file."
        )
    check_bindable(host, port)
    engine = load_engine(recipe, name, max_queue, max_batch)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.stop()  # the running generation ends at its next token
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(engine, key), host=host, port=port, log_level="info")
    Server(config).run()
