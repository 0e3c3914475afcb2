"""The HTTP side (aiohttp): send one request and stream its response into an ``Outcome``.

Each request runs under ``asyncio.wait_for``: a stalled server costs at most ``timeout_s`` per request
and is counted as a "timeout" error, so a run always ends.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from serving.bench.clients import Api, LineSplitter, Outcome
from serving.bench.prompts import Prompt


def new_session(max_connections: int) -> aiohttp.ClientSession:
    """aiohttp's default pool allows 100 connections; the load runner needs one per in-flight request."""
    connector = aiohttp.TCPConnector(limit=max(1, max_connections), force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    api: Api,
    prompt: Prompt,
    max_new_tokens: int,
    timeout_s: float,
) -> Outcome:
    out = Outcome(start=time.perf_counter(), prompt_tokens=prompt.tokens)
    try:
        await asyncio.wait_for(
            _exchange(session, base_url + api.path, api.body(prompt.text, max_new_tokens), api, out),
            timeout_s,
        )
    except asyncio.TimeoutError:
        out.fail("timeout", f"no complete response within {timeout_s:g} s")
    except (aiohttp.ClientError, OSError) as exc:
        out.fail("connection", repr(exc))
    except Exception as exc:  # a surprise must cost one request, not the run
        out.fail("client_error", repr(exc))
    out.end = time.perf_counter()
    api.finish(out, max_new_tokens)
    return out


async def _exchange(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], api: Api, out: Outcome
) -> None:
    async with session.post(url, json=body) as resp:
        if resp.status >= 400:
            out.fail(f"http_{resp.status}", (await resp.read())[:300].decode("utf-8", "replace"))
            return
        splitter = LineSplitter()
        async for chunk in resp.content.iter_any():
            now = time.perf_counter()
            for line in splitter.feed(chunk):
                api.feed_line(line, out, now)
            if not out.ok:
                return
        for line in splitter.flush():
            api.feed_line(line, out, time.perf_counter())


async def discover_model(session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> str:
    """The first model id of GET /v1/models, for OpenAI-compatible servers when --model is not given."""
    async with session.get(base_url + "/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        resp.raise_for_status()
        data = (await resp.json(content_type=None)).get("data") or []
    if not data or not data[0].get("id"):
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return str(data[0]["id"])


async def tgi_accepts_ignore_eos(session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> bool:
    """One 1-token request with ``parameters.ignore_eos``: servers that validate fields reject it (4xx).

    A 2xx only proves the field is tolerated, not honoured; early EOS then shows up as "short" errors.
    """
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 1, "ignore_eos": True}}
    limit = aiohttp.ClientTimeout(total=timeout_s)
    async with session.post(base_url + "/generate_stream", json=body, timeout=limit) as resp:
        await resp.read()
        return resp.status < 400
