"""Soak: every dialect, streaming and not, at 8 x slots clients, with random client disconnects, one
model-worker SIGKILL, and a SIGTERM while requests are still in flight. Every request sent is accounted for.

Starts ``lmi serve`` (the default model unless --model-dir) with ``max_rolling_batch_size=--slots`` on a
free port and runs closed-loop clients, each picking a route at random: LMI /invocations, OpenAI
/v1/completions and /v1/chat/completions (each plain and streaming), TGI /generate and /generate_stream.
A fraction of streams is closed by the client after a random number of events. At --kill-at seconds the
model worker (found in the server's process tree) gets SIGKILL; at --duration the server gets SIGTERM,
clients stop (each sends one more request, which must be refused cleanly), and in-flight requests finish.

Acceptable outcomes: ok (200, complete; a stream ends with its dialect's final event), disconnected (by
the client, on purpose), refused (4xx/503 with a JSON error body), failed / error_event (a JSON error,
or a stream's final error event) only for requests in flight on the killed worker or when SIGTERM came,
closed (connection refused) only for requests sent after SIGTERM. Anything else (a hang past --timeout,
a stream without its final event, a missing body) is an offender. Exit 1 names each offender and each
failed check: the kill happened, requests were served after the restart, the server exited within
--exit-limit seconds of SIGTERM. Prints a table and one JSON line.

    python scripts/soak.py --duration 150 --slots 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(p) for p in (ROOT, ROOT / "tests") if str(p) not in sys.path]

from support import ServerProcess  # noqa: E402

from scripts.bench_overload import cmdline, descendants  # noqa: E402
from serving.bench.clients import Api, LineSplitter, Outcome, make_api  # noqa: E402
from serving.bench.prompts import PromptSource  # noqa: E402
from serving.bench.stats import percentile  # noqa: E402
from serving.bench.transport import discover_model, new_session  # noqa: E402


@dataclass(frozen=True)
class Route:
    name: str
    api: str
    """serving.bench.clients API name: its body and its stream parser (final event, error event)."""
    path: str
    stream: bool


ROUTES = (
    Route("lmi", "lmi", "/invocations", False),
    Route("lmi-stream", "lmi", "/invocations", True),
    Route("completions", "openai-completions", "/v1/completions", False),
    Route("completions-stream", "openai-completions", "/v1/completions", True),
    Route("chat", "openai-chat", "/v1/chat/completions", False),
    Route("chat-stream", "openai-chat", "/v1/chat/completions", True),
    Route("tgi", "tgi", "/generate", False),
    Route("tgi-stream", "tgi", "/generate_stream", True),
)
ANSWER_KEY = {
    "lmi": "generated_text",
    "openai-completions": "choices",
    "openai-chat": "choices",
    "tgi": "generated_text",
}
"""The key a plain (non-stream) 200 answer of each API must carry."""
ACCEPTED = ("ok", "disconnected", "refused")
"""Outcomes fine at any time; failed/error_event/closed are fine only at the kill or the shutdown."""


@dataclass
class SoakConfig:
    model_dir: str | None = None
    slots: int = 8
    clients: int = 0
    """0: 8 x slots."""
    duration_s: float = 150.0
    kill_at_s: float | None = None
    """Seconds after the load starts; None: 40 % of the duration."""
    timeout_s: float = 120.0
    exit_limit_s: float = 30.0
    disconnect_fraction: float = 0.1
    min_tokens: int = 8
    max_tokens: int = 64
    max_requests: int = 100_000
    seed: int = 0
    env: dict[str, str] = field(default_factory=dict)
    server_log: str | None = None
    """Where to copy the server's whole log at the end (else only its tail is shown, on failure)."""

    def __post_init__(self) -> None:
        self.clients = self.clients or 8 * self.slots
        self.kill_at_s = 0.4 * self.duration_s if self.kill_at_s is None else self.kill_at_s
        if not 0 < self.kill_at_s < self.duration_s:
            raise ValueError(
                f"--kill-at {self.kill_at_s:g} must be within (0, --duration {self.duration_s:g})"
            )


@dataclass
class Request:
    """One request sent and what became of it; times are perf_counter seconds."""

    index: int
    route: Route
    api: Api
    body: dict[str, Any]
    close_after: int = 0
    """Stream events after which the client hangs up on purpose (0: never)."""
    start: float = 0.0
    end: float = 0.0
    status: int | None = None
    kind: str = ""
    detail: str = ""
    events: int = 0


@dataclass
class Timeline:
    start: float
    kill: float | None = None
    restarted: float | None = None
    term: float | None = None
    exited: float | None = None
    problems: list[str] = field(default_factory=list)


def judge_body(route: Route, status: int, raw: bytes) -> tuple[str, str]:
    """A whole (non-stream, or error) answer: its kind, and what was wrong with it if anything."""
    try:
        body = json.loads(raw)
    except ValueError:
        return "no_body", f"HTTP {status} with a body that is not JSON: {raw[:200]!r}"
    key = ANSWER_KEY[route.api] if status == 200 else "error"
    if not isinstance(body, dict) or key not in body:
        return "no_body", f"HTTP {status} without {key!r}: {raw[:200]!r}"
    if status == 200:
        return "ok", ""
    failed = status >= 500 and status != 503 or status == 424  # 424: TGI's failed generation
    return ("failed" if failed else "refused"), f"HTTP {status}: {raw[:200]!r}"


async def read_stream(resp: aiohttp.ClientResponse, req: Request) -> None:
    """To the end of the stream (even past an error event: the stream must still end), or until the
    client's planned disconnect."""
    out, splitter = Outcome(start=req.start), LineSplitter()
    async for chunk in resp.content.iter_any():
        lines = splitter.feed(chunk)
        req.events += sum(1 for line in lines if line.strip())
        for line in lines:
            req.api.feed_line(line, out, 0.0)
        if req.close_after and req.events >= req.close_after and not out.done and out.ok:
            resp.close()
            req.kind = "disconnected"
            return
    for line in splitter.flush():
        req.api.feed_line(line, out, 0.0)
    if out.error == "in_band":
        req.kind, req.detail = "error_event", out.detail
    elif out.error:
        req.kind, req.detail = "bad_stream", f"{out.error}: {out.detail}"
    else:
        req.kind = "ok" if out.done else "no_final_event"


async def exchange(session: aiohttp.ClientSession, url: str, req: Request) -> None:
    async with session.post(url + req.route.path, json=req.body) as resp:
        req.status = resp.status
        if resp.status != 200 or not req.route.stream:
            req.kind, req.detail = judge_body(req.route, resp.status, await resp.read())
        else:
            await read_stream(resp, req)


async def send(session: aiohttp.ClientSession, url: str, req: Request, timeout_s: float) -> Request:
    req.start = time.perf_counter()
    try:
        await asyncio.wait_for(exchange(session, url, req), timeout_s)
    except asyncio.TimeoutError:
        req.kind, req.detail = "hung", f"no complete answer within {timeout_s:g} s ({req.events} events)"
    except (aiohttp.ClientError, OSError) as exc:
        if req.status is None:
            req.kind = "closed"
        else:
            req.kind = "no_final_event" if req.route.stream and req.status == 200 else "no_body"
        req.detail = repr(exc)[:300]
    except Exception as exc:  # a surprise costs one request, not the run
        req.kind, req.detail = "client_error", repr(exc)[:300]
    req.end = time.perf_counter()
    return req


def plan(index: int, route: Route, api: Api, prompt: str, tokens: int, close_after: int = 0) -> Request:
    body = api.body(prompt, tokens)
    if route.api != "tgi":  # TGI picks streaming by path
        body["stream"] = route.stream
    if not route.stream:
        body.pop("stream_options", None)
    return Request(index, route, api, body, close_after)


class Load:
    """Closed-loop clients over the routes; stops issuing at SIGTERM (after one more request each)."""

    def __init__(self, cfg: SoakConfig, url: str, apis: dict[str, Api], tl: Timeline) -> None:
        self.cfg, self.url, self.apis, self.tl = cfg, url, apis, tl
        self.prompts = PromptSource(8, 48, cfg.seed)
        self.requests: list[Request] = []
        self.sent = 0

    async def client(self, session: aiohttp.ClientSession, number: int) -> None:
        rng = random.Random(self.cfg.seed * 1_000_003 + number)
        while self.sent < self.cfg.max_requests:
            last = self.tl.term is not None  # one request after SIGTERM: it must be refused cleanly
            route = rng.choice(ROUTES)
            tokens = rng.randint(self.cfg.min_tokens, self.cfg.max_tokens)
            close_after = 0
            if route.stream and rng.random() < self.cfg.disconnect_fraction:
                close_after = rng.randint(1, max(1, tokens // 2))
            prompt = self.prompts.get(self.sent).text
            req = plan(self.sent, route, self.apis[route.api], prompt, tokens, close_after)
            self.sent += 1
            self.requests.append(await send(session, self.url, req, self.cfg.timeout_s))
            if last:
                return


def model_workers(server_pid: int) -> list[int]:
    return [pid for pid in descendants(server_pid) if "handlers.worker" in cmdline(pid)]


async def kill_worker(
    session: aiohttp.ClientSession, srv: ServerProcess, cfg: SoakConfig, tl: Timeline
) -> None:
    """SIGKILL the model worker, then wait (bounded) for its replacement to be up and /ping healthy."""
    await asyncio.sleep(cfg.kill_at_s)
    workers = model_workers(srv.proc.pid)
    if not workers:
        tl.problems.append("no model worker (handlers.worker) in the server's process tree to kill")
        return
    os.kill(workers[0], signal.SIGKILL)
    tl.kill = time.perf_counter()
    deadline = tl.kill + cfg.timeout_s
    while time.perf_counter() < deadline and tl.term is None:
        if [p for p in model_workers(srv.proc.pid) if p != workers[0]]:
            try:
                async with session.get(srv.url + "/ping", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        tl.restarted = time.perf_counter()
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
        await asyncio.sleep(0.2)
    tl.problems.append(f"the model worker was not back (/ping 200) before SIGTERM or {cfg.timeout_s:g} s")


async def terminate(srv: ServerProcess, cfg: SoakConfig, tl: Timeline) -> None:
    tl.term = time.perf_counter()
    srv.proc.send_signal(signal.SIGTERM)
    while srv.proc.poll() is None and time.perf_counter() < tl.term + cfg.exit_limit_s:
        await asyncio.sleep(0.05)
    if srv.proc.poll() is None:
        tl.problems.append(f"the server did not exit within {cfg.exit_limit_s:g} s of SIGTERM")
    else:
        tl.exited = time.perf_counter()


async def drive(srv: ServerProcess, cfg: SoakConfig, apis: dict[str, Api]) -> tuple[Load, Timeline]:
    tl = Timeline(time.perf_counter())
    load = Load(cfg, srv.url, apis, tl)
    async with new_session(cfg.clients + 4) as session:
        tasks = [asyncio.create_task(load.client(session, n)) for n in range(cfg.clients)]
        killer = asyncio.create_task(kill_worker(session, srv, cfg, tl))
        await asyncio.sleep(cfg.duration_s)
        await terminate(srv, cfg, tl)
        _, late = await asyncio.wait([*tasks, killer], timeout=cfg.timeout_s + 10)
        for task in late:  # cannot happen (every request is bounded); a bug here must not hang the soak
            task.cancel()
    return load, tl


async def warm_up(srv: ServerProcess, cfg: SoakConfig) -> dict[str, Api]:
    """The APIs (the OpenAI model name from /v1/models), and one request per route, each of which must
    succeed: a broken route fails the soak at once, not as thousands of offenders."""
    async with new_session(2) as session:
        model = await discover_model(session, srv.url, 30)
        apis = {name: make_api(name, model) for name in ANSWER_KEY}
        for route in ROUTES:
            req = await send(
                session, srv.url, plan(-1, route, apis[route.api], "Hello there", 4), cfg.timeout_s
            )
            if req.kind != "ok":
                raise RuntimeError(f"warm-up {route.name} {route.path}: {req.kind} {req.detail}")
    return apis


def offence(req: Request, tl: Timeline) -> str | None:
    """Why this outcome is not acceptable, or None."""
    if req.kind in ACCEPTED:
        return None
    at_kill = tl.kill is not None and req.start < (tl.restarted or float("inf")) and req.end > tl.kill
    at_term = tl.term is not None and req.end > tl.term
    if req.kind in ("failed", "error_event") and (at_kill or at_term):
        return None
    if req.kind == "closed" and tl.term is not None and req.start >= tl.term:
        return None
    when = req.start - tl.start
    return f"request {req.index} ({req.route.name}, sent at {when:.1f} s): {req.kind} {req.detail}".strip()


def build_report(cfg: SoakConfig, load: Load, tl: Timeline) -> dict[str, Any]:
    offenders = [o for o in (offence(r, tl) for r in load.requests) if o]
    unaccounted = load.sent - len(load.requests)
    hung = sum(r.kind == "hung" for r in load.requests) + unaccounted
    problems = list(tl.problems)
    served_after = sum(r.kind == "ok" and tl.kill is not None and r.start > tl.kill for r in load.requests)
    if tl.kill is None:
        problems.append("the model worker was not killed")
    elif not served_after:
        problems.append("no request was served after the model worker restarted")
    ok_ms = [(r.end - r.start) * 1000 for r in load.requests if r.kind == "ok"]
    return {
        "duration_s": round((tl.term or tl.start) - tl.start, 1),
        "slots": cfg.slots,
        "clients": cfg.clients,
        "requests": load.sent,
        "outcomes": dict(Counter(r.kind for r in load.requests).most_common()),
        "by_route": {r.name: dict(Counter(x.kind for x in load.requests if x.route is r)) for r in ROUTES},
        "in_flight_at_sigterm": dict(
            Counter(r.kind for r in load.requests if r.start < (tl.term or 0) < r.end)
        ),
        "sent_after_sigterm": dict(Counter(r.kind for r in load.requests if tl.term and r.start >= tl.term)),
        "examples": {r.kind: r.detail for r in reversed(load.requests) if r.detail},
        "lost": len(offenders) - sum(r.kind == "hung" for r in load.requests),
        "hung": hung,
        "worker_kill": {
            "at_s": round(tl.kill - tl.start, 2) if tl.kill else None,
            "back_after_s": round(tl.restarted - tl.kill, 2) if tl.restarted and tl.kill else None,
            "ok_sent_after_kill": served_after,  # only the restarted worker can have served these
        },
        "sigterm_exit_s": round(tl.exited - tl.term, 2) if tl.exited and tl.term else None,
        "latency_ms": {f"p{q}": round(percentile(ok_ms, q)) for q in (50, 99)} if ok_ms else {},
        "offenders": offenders,
        "problems": problems,
        "passed": not offenders and not problems and not hung,
    }


def run_soak(cfg: SoakConfig, log: Any = sys.stderr) -> dict[str, Any]:
    env = {"OPTION_MAX_ROLLING_BATCH_SIZE": str(cfg.slots), **cfg.env}
    with ServerProcess(cfg.model_dir, env) as srv:
        srv.wait_ready(timeout_s=600)
        apis = asyncio.run(warm_up(srv, cfg))
        print(
            f"soak: {cfg.clients} clients, {cfg.duration_s:g} s, worker kill at {cfg.kill_at_s:g} s", file=log
        )
        load, tl = asyncio.run(drive(srv, cfg, apis))
        report = build_report(cfg, load, tl)
        if cfg.server_log:
            shutil.copyfile(srv.log.name, cfg.server_log)
        if not report["passed"]:
            print(srv.output()[-3000:], file=log)
    return report


def print_report(report: dict[str, Any]) -> None:
    kinds = sorted({k for counts in report["by_route"].values() for k in counts})
    print("| route | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 1) + "|")
    for name, counts in [*report["by_route"].items(), ("all", report["outcomes"])]:
        print(f"| {name} | " + " | ".join(str(counts.get(k, 0)) for k in kinds) + " |")
    kill = report["worker_kill"]
    print(
        f"requests {report['requests']}, lost {report['lost']}, hung {report['hung']}; worker killed at "
        f"{kill['at_s']} s, back after {kill['back_after_s']} s, {kill['ok_sent_after_kill']} sent "
        f"after it ok; SIGTERM exit {report['sigterm_exit_s']} s; ok latency {report['latency_ms']} ms\n"
        f"in flight at SIGTERM: {report['in_flight_at_sigterm']}; sent after: {report['sent_after_sigterm']}"
    )
    for line in report["offenders"] + report["problems"]:
        print("FAIL: " + line, file=sys.stderr)
    print(json.dumps(report))


def parse_args(argv: list[str] | None) -> SoakConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model-dir", help="model folder (default: the default model)")
    parser.add_argument("--slots", type=int, default=8, help="option.max_rolling_batch_size (8)")
    parser.add_argument("--clients", type=int, default=0, help="concurrent clients (default 8 x slots)")
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of load before SIGTERM (150)")
    parser.add_argument("--kill-at", type=float, help="seconds into the load to SIGKILL the worker (40 %%)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds (120)")
    parser.add_argument(
        "--exit-limit", type=float, default=30.0, help="seconds the server may take after SIGTERM"
    )
    parser.add_argument("--disconnect-fraction", type=float, default=0.1, help="streams closed early (0.1)")
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--env", nargs="*", default=[], help="extra KEY=VALUE for the server")
    parser.add_argument("--server-log", help="copy the server's whole log to this file")
    a = parser.parse_args(argv)
    return SoakConfig(
        a.model_dir, a.slots, a.clients, a.duration, a.kill_at, a.timeout, a.exit_limit,
        a.disconnect_fraction, a.min_tokens, a.max_tokens, a.max_requests, a.seed,
        dict(item.split("=", 1) for item in a.env), a.server_log,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    report = run_soak(parse_args(argv))
    print_report(report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
