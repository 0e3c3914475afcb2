"""Runs the benchmark against a server: resolve the API (model name, TGI probe), warm up, run each row.

Each row gets a fresh HTTP session so rows start from the same state (no connections left over from a
previous row, nor gone stale while the baseline ran).
"""

from __future__ import annotations

from collections.abc import Callable

from serving.bench import transport
from serving.bench.clients import Api, Outcome, make_api
from serving.bench.config import BenchConfig
from serving.bench.load import LoadResult, closed_loop, open_loop
from serving.bench.prompts import PromptSource
from serving.bench.stats import summarize

FATAL_WARMUP = ("short",)
"""Warm-up failures that do not stop the run (TGI cannot be told to ignore EOS)."""


class BenchError(Exception):
    """The server cannot be benchmarked as configured (unreachable, wrong API, no model)."""


async def resolve_api(cfg: BenchConfig) -> Api:
    """The API client, with the model name (OpenAI) or the ignore_eos decision (TGI) filled in."""
    async with transport.new_session(2) as session:
        try:
            if cfg.api.startswith("openai") and not cfg.model:
                cfg.model = await transport.discover_model(session, cfg.url, cfg.timeout_s)
            ignore_eos = cfg.tgi_ignore_eos == "on"
            if cfg.api == "tgi" and cfg.tgi_ignore_eos == "auto":
                ignore_eos = await transport.tgi_accepts_ignore_eos(session, cfg.url, cfg.timeout_s)
        except Exception as exc:
            raise BenchError(f"cannot reach {cfg.url} as {cfg.api!r}: {exc!r}") from exc
    cfg.tgi_ignore_eos = ("on" if ignore_eos else "off") if cfg.api == "tgi" else None
    return make_api(cfg.api, cfg.model or "", ignore_eos)


async def warm_up(cfg: BenchConfig, api: Api, prompts: PromptSource) -> None:
    """Untimed requests (prompts outside the measured set); a hard failure stops the benchmark early."""
    async with transport.new_session(1) as session:
        for k in range(cfg.warmup):
            out = await transport.send(
                session, cfg.url, api, prompts.get(-1 - k), cfg.max_new_tokens, cfg.timeout_s
            )
            if not out.ok and out.error not in FATAL_WARMUP:
                raise BenchError(f"warm-up request to {cfg.url}{api.path} failed: {out.error}: {out.detail}")


async def run_row(cfg: BenchConfig, api: Api, prompts: PromptSource, mode: str, level: float) -> dict:
    async def send(index: int) -> Outcome:
        return await transport.send(
            session, cfg.url, api, prompts.get(index), cfg.max_new_tokens, cfg.timeout_s
        )

    count = cfg.row_requests(mode, level)
    pool = int(level) if mode == "closed" else cfg.max_concurrency
    async with transport.new_session(pool) as session:
        if mode == "closed":
            result: LoadResult = await closed_loop(send, int(level), count, cfg.duration_s)
        else:
            result = await open_loop(send, level, cfg.max_concurrency, count, cfg.duration_s, cfg.seed)
    head = {
        "mode": mode,
        "concurrency": int(level) if mode == "closed" else None,
        "rate": level if mode == "open" else None,
        "max_in_flight": result.max_in_flight,
    }
    return head | summarize(result.outcomes, result.wall_s)


async def run_rows(
    cfg: BenchConfig, api: Api, prompts: PromptSource, progress: Callable[[str], None] = lambda _: None
) -> list[dict]:
    rows = []
    for mode, level in cfg.loads():
        what = f"concurrency {int(level)}" if mode == "closed" else f"rate {level:g}/s"
        count = cfg.row_requests(mode, level)
        limits = [
            f"{count} requests" if count is not None else "",
            f"{cfg.duration_s:g} s" if cfg.duration_s else "",
        ]
        progress(f"{mode} loop, {what}, {' or '.join(x for x in limits if x)}")
        rows.append(await run_row(cfg, api, prompts, mode, level))
    return rows
