"""OpenAI-compatible chat clients with one retry policy: the key from the environment, backoff on transient failures."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestStats:
    requests: int = 0
    retries: int = 0
    malformed: int = 0
    failures: list[str] = field(default_factory=list)


# Variables a key may be read from: these, or any name ending in _API_KEY. A config names the
# variable and the server it is sent to, so it must not be able to send any other secret there.
KEY_VARIABLES = ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "GEMINI_API_KEY", "HF_TOKEN", "VLLM_API_KEY")


def api_key(api_key_env: str) -> str:
    """The key in ``$api_key_env``: a documented name (or ``*_API_KEY``), and set."""
    if api_key_env not in KEY_VARIABLES and not api_key_env.endswith("_API_KEY"):
        raise ValueError(f"api_key_env {api_key_env!r} is not a key variable: use one of {', '.join(KEY_VARIABLES)} "
                         "or a name ending in _API_KEY")
    key = os.environ.get(api_key_env)
    if not key:
        raise ValueError(f"${api_key_env} is not set: export the server's key (any non-empty text for a server "
                         "that needs none)")
    return key


def chat_client(base_url: str | None, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0):
    """An ``openai.OpenAI`` client. The key is read from ``api_key_env`` (see :func:`api_key`) here
    and kept only in the client; the client's own retries are off, because the policy (and its
    counting) is ours."""
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key(api_key_env), timeout=timeout, max_retries=0)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def json_reply(text: str) -> Any:
    """The JSON value a chat model answered with, bare or inside a ```json fence; ``ValueError``
    (``json.JSONDecodeError``) when there is none."""
    match = _FENCE.search(text)
    return json.loads((match.group(1) if match else text).strip())


class RefusedRequest(ConnectionError):
    """The server refused for good (400, 401, 403, 404, ...): asking again will not help."""


def complete(client, stats: RequestStats, max_retries: int, backoff: float, what: str = "LLM server",
             **request: Any) -> str:
    """One chat completion's text. 429, 5xx, timeouts and broken connections are retried after
    ``backoff * 2^k`` seconds, at most ``max_retries`` times; then ``ConnectionError``. Any other
    HTTP error is final at once: :class:`RefusedRequest`, naming the status (never the key)."""
    import openai

    transient = (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError)
    for attempt in range(max_retries + 1):
        try:
            stats.requests += 1
            reply = client.chat.completions.create(**request)
            return reply.choices[0].message.content or ""
        except openai.APIStatusError as err:
            if isinstance(err, transient):
                if attempt == max_retries:
                    raise ConnectionError(f"{what} failed {attempt + 1} times: {type(err).__name__}") from None
                stats.retries += 1
                time.sleep(backoff * 2**attempt)
                continue
            hint = {401: " (the key was refused)", 403: " (the key may not use this model)"}.get(err.status_code, "")
            raise RefusedRequest(f"{what} answered HTTP {err.status_code} {type(err).__name__}{hint}") from None
        except transient as err:
            if attempt == max_retries:
                raise ConnectionError(f"{what} failed {attempt + 1} times: {type(err).__name__}") from None
            stats.retries += 1
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")
