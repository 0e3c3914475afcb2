"""OpenAI chat ``messages`` checked and flattened to what a tokenizer chat template expects."""

from __future__ import annotations

from typing import Any

from handlers.builtin.formats.errors import RequestError

ROLES = ("system", "developer", "user", "assistant", "tool")


def _text_of(content: Any, where: str) -> str:
    """String content as is; a list of text parts joined, since templates mostly expect strings."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"`{where}` must be a string or a list of text parts, got {content!r}.")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RequestError(
                f"`{where}[{i}]` is {part!r}; only text parts "
                '({"type": "text", "text": "..."}) are supported by this text-only server.'
            )
        texts.append(part["text"])
    return "".join(texts)


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    """Validate roles and content; returns new dicts with string content (other keys kept)."""
    if not isinstance(raw, list) or not raw:
        raise RequestError(
            f'`messages` must be a non-empty list like [{{"role": "user", "content": "Hi"}}], got {raw!r}.'
        )
    messages = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"`{where}` must be an object with `role` and `content`, got {message!r}.")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"`{where}.role` must be one of {', '.join(ROLES)}; got {role!r}.")
        content = message.get("content")
        if content is None and role != "assistant":
            raise RequestError(f"`{where}.content` is required for role {role!r}.")
        text = "" if content is None else _text_of(content, f"{where}.content")
        messages.append({**message, "content": text})
    return messages
