"""serving.bench: stats, prompts, stream parsers, load runners and the CLI against a fake streaming server."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from aiohttp import web

from serving.bench import report
from serving.bench.baseline import measure
from serving.bench.cli import build_parser, run
from serving.bench.clients import LineSplitter, Outcome, make_api
from serving.bench.config import BenchConfig
from serving.bench.load import closed_loop, open_loop
from serving.bench.prompts import PromptSource
from serving.bench.runner import resolve_api, run_row
from serving.bench.stats import describe, percentile, summarize

# --- stats -------------------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    values = list(range(1, 11))
    assert percentile(values, 50) == 5.5
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 10
    assert percentile([3.0], 99) == 3.0
    rng = random.Random(1)
    data = [rng.expovariate(1.0) for _ in range(101)]
    for q in (50, 90, 99):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_describe_reports_ms_and_none_when_empty() -> None:
    assert describe([0.1, 0.2, 0.3]) == {"mean": 200.0, "p50": 200.0, "p90": 280.0, "p99": 298.0}
    assert describe([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_summarize_counts_goodput_and_pools_itl() -> None:
    good = Outcome(start=0.0, end=1.0, token_times=[0.1, 0.2, 0.4], prompt_tokens=10, done=True)
    bad = Outcome(start=0.0, end=0.5, token_times=[0.3])
    bad.fail("in_band", "boom")
    s = summarize([good, bad], wall_s=2.0)
    assert (s["requests"], s["completed"], s["errors"]) == (2, 1, 1)
    assert s["error_kinds"] == {"in_band": 1}
    assert s["first_error"] == "in_band: boom"
    assert s["requests_per_min"] == 30.0
    assert s["output_tokens_per_s"] == 1.5
    assert s["ttft_ms"]["p50"] == 100.0
    assert s["itl_ms"]["mean"] == 150.0  # gaps 0.1 and 0.2; the failed request's timings are left out
    assert s["e2e_ms"]["p99"] == 1000.0


# --- prompts -----------------------------------------------------------------------------------------


def test_prompts_lengths_in_range_and_seeded() -> None:
    source = PromptSource(20, 200, seed=7)
    prompts = [source.get(i) for i in range(300)]
    assert all(20 <= p.tokens <= 200 and len(p.text.split()) == p.tokens for p in prompts)
    assert min(p.tokens for p in prompts) < 50
    assert max(p.tokens for p in prompts) > 170
    again = PromptSource(20, 200, seed=7)
    assert [again.get(i) for i in reversed(range(300))][::-1] == prompts  # order of requests is irrelevant
    assert PromptSource(20, 200, seed=8).get(0) != prompts[0]
    with pytest.raises(ValueError, match="prompt-len"):
        PromptSource(10, 5, seed=0)


class CharTokenizer:
    """One token per character: exact, so trimming to a token count can be checked."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], **kwargs: object) -> str:
        return "".join(chr(i) for i in ids)


def test_prompts_trimmed_with_tokenizer() -> None:
    source = PromptSource(5, 60, seed=3, tokenizer=CharTokenizer())
    for i in range(50):
        prompt = source.get(i)
        assert 5 <= prompt.tokens <= 60
        assert len(prompt.text) == prompt.tokens


# --- stream parsers ----------------------------------------------------------------------------------


def parse(api_name: str, body: bytes, max_new: int, piece: int = 7) -> Outcome:
    """Feed ``body`` in ``piece``-byte chunks (lines split across chunks) one ms apart."""
    api = make_api(api_name, model="m")
    out, splitter = Outcome(start=0.0), LineSplitter()
    for n, at in enumerate(range(0, len(body), piece)):
        for line in splitter.feed(body[at : at + piece]):
            api.feed_line(line, out, now=(n + 1) / 1000)
    for line in splitter.flush():
        api.feed_line(line, out, now=1.0)
    out.end = 1.0
    api.finish(out, max_new)
    return out


def jl(*objs: object) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def sse(*objs: object, space: bool = True, done: bool = True) -> bytes:
    prefix = b"data: " if space else b"data:"
    return b"".join(prefix + json.dumps(o).encode() + b"\n\n" for o in objs) + (
        b"data: [DONE]\n\n" if done else b""
    )


def lmi_tok(i: int) -> dict:
    return {"token": {"id": i, "text": f" w{i}", "log_prob": -0.5}}


LMI_ERROR_LINE = {
    "token": {"id": -1, "text": "", "log_prob": -1, "special_token": True},
    "generated_text": "",
    "details": {"finish_reason": "error", "generated_tokens": 1, "inputs": "hi"},
    "error": "CUDA out of memory",
    "code": 424,
}


def test_lmi_jsonlines_ok_and_timestamps() -> None:
    last = lmi_tok(2) | {"generated_text": " w0 w1 w2"}
    out = parse("lmi", jl(lmi_tok(0), lmi_tok(1), last), max_new=3)
    assert out.ok
    assert out.done
    assert out.tokens == 3
    assert out.ttft is not None
    assert 0 < out.ttft < out.e2e
    assert len(out.itls) == 2
    assert all(gap >= 0 for gap in out.itls)


def test_lmi_placeholder_final_line_is_not_a_token() -> None:
    placeholder = {
        "token": {"id": -1, "text": "", "log_prob": None, "special_token": True},
        "generated_text": "x",
    }
    out = parse("lmi", jl(lmi_tok(0), lmi_tok(1), placeholder), max_new=2)
    assert out.ok
    assert out.tokens == 2


@pytest.mark.parametrize(
    ("body", "max_new", "kind"),
    [
        (jl(lmi_tok(0), LMI_ERROR_LINE), 3, "in_band"),
        (
            jl(lmi_tok(0), {"token": LMI_ERROR_LINE["token"], "details": {"finish_reason": "error"}}),
            3,
            "in_band",
        ),
        (jl(lmi_tok(0), lmi_tok(1) | {"generated_text": "a"}), 3, "short"),
        (jl(lmi_tok(0), lmi_tok(1)), 2, "incomplete"),
        (b'{"token": {"id": 1, "te\n', 1, "bad_stream"),
    ],
)
def test_lmi_failures(body: bytes, max_new: int, kind: str) -> None:
    out = parse("lmi", body, max_new)
    assert out.error == kind
    if kind == "in_band" and b"CUDA" in body:
        assert "CUDA out of memory" in out.detail


def completion_chunk(text: str, finish: str | None = None) -> dict:
    return {
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "finish_reason": finish}],
        "usage": None,
    }


def test_openai_completions_sse_with_usage_and_done() -> None:
    usage = {
        "object": "text_completion",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4},
    }
    body = sse(
        completion_chunk("a"),
        completion_chunk(""),
        completion_chunk("b"),
        completion_chunk("c", "length"),
        usage,
    )
    out = parse("openai-completions", body, max_new=4)
    assert out.ok
    assert out.done
    assert len(out.token_times) == 3  # the empty-text chunk is no token event
    assert out.tokens == 4  # but the server's usage count wins


def test_openai_completions_without_done_or_with_error() -> None:
    body = sse(completion_chunk("a"), completion_chunk("b", "length"), done=False)
    assert parse("openai-completions", body, max_new=2).error == "incomplete"
    error = {"error": {"message": "boom", "type": "server_error", "code": 500}}
    assert parse("openai-completions", sse(completion_chunk("a"), error), max_new=2).error == "in_band"
    assert parse("openai-completions", sse(completion_chunk("a")), max_new=2).error == "short"


def test_openai_chat_counts_content_deltas_only() -> None:
    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    body = b": keep-alive comment\n\n" + sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hi"}),
        chunk({"content": "!"}, "length"),
    )
    out = parse("openai-chat", body, max_new=2)
    assert out.ok
    assert out.tokens == 2
    assert out.usage_tokens is None


def tgi_event(i: int, last: bool = False) -> dict:
    token = {"id": i, "text": f" t{i}", "logprob": -0.1, "special": False}
    return {"index": i + 1, "token": token, "generated_text": "all" if last else None, "details": None}


def test_tgi_sse() -> None:
    body = sse(tgi_event(0), tgi_event(1), tgi_event(2, last=True), space=False, done=False)
    out = parse("tgi", body, max_new=3)
    assert out.ok
    assert out.tokens == 3
    err = sse(tgi_event(0), {"error": "overloaded", "error_type": "overloaded"}, space=False, done=False)
    assert parse("tgi", err, max_new=3).error == "in_band"


def test_request_bodies() -> None:
    assert make_api("lmi").body("p", 8) == {
        "inputs": "p",
        "parameters": {"max_new_tokens": 8, "ignore_eos": True},
        "stream": True,
    }
    chat = make_api("openai-chat", model="m").body("p", 8)
    assert chat["messages"] == [{"role": "user", "content": "p"}]
    assert chat["max_tokens"] == 8
    comp = make_api("openai-completions", model="m").body("p", 8)
    assert comp["stream_options"] == {"include_usage": True}
    assert comp["ignore_eos"] is True
    assert "ignore_eos" not in make_api("tgi").body("p", 8)["parameters"]
    assert make_api("tgi", tgi_ignore_eos=True).body("p", 8)["parameters"]["ignore_eos"] is True


# --- load runners with a fake send (no network) ------------------------------------------------------


def fake_send(seen: list[int], latency: float = 0.01) -> Callable:
    async def send(index: int) -> Outcome:
        seen.append(index)
        start = time.perf_counter()
        await asyncio.sleep(latency)
        return Outcome(start=start, end=time.perf_counter(), token_times=[time.perf_counter()], done=True)

    return send


def test_closed_loop_runs_each_index_once_at_concurrency() -> None:
    seen: list[int] = []
    result = asyncio.run(closed_loop(fake_send(seen), concurrency=3, num_requests=10))
    assert sorted(seen) == list(range(10))
    assert len(result.outcomes) == 10
    assert result.max_in_flight == 3


def test_open_loop_respects_cap_and_duration() -> None:
    seen: list[int] = []
    result = asyncio.run(open_loop(fake_send(seen, 0.05), rate=400, max_concurrency=2, num_requests=12))
    assert sorted(seen) == list(range(12))
    assert result.max_in_flight == 2
    started = time.perf_counter()
    result = asyncio.run(open_loop(fake_send([], 0.01), rate=50, max_concurrency=8, duration_s=0.3))
    assert 3 <= len(result.outcomes) <= 40
    assert time.perf_counter() - started < 1.0
    with pytest.raises(ValueError, match="never end"):
        asyncio.run(closed_loop(fake_send([]), concurrency=1))


# --- a fake streaming server (aiohttp.web in a thread) -----------------------------------------------


class FakeServer:
    """Streams max-new-tokens tokens in the requested API's format; ``plan(n)`` picks request n's fate."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, plan: Callable[[int], str] = lambda n: "ok", delay: float = 0.002) -> None:
        self.plan, self.delay = plan, delay
        self.count = self.in_flight = self.max_in_flight = 0

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        api = {"/invocations": "lmi", "/generate_stream": "tgi", "/v1/completions": "completions"}.get(
            request.path, "chat"
        )
        params = body.get("parameters", {})
        if api == "tgi" and "ignore_eos" in params:  # a validating server, as TGI-compatible ones may be
            return web.json_response({"error": "Unknown field parameters.ignore_eos"}, status=422)
        self.count += 1
        fate = self.plan(self.count)
        if fate == "http500":
            return web.json_response({"error": "boom"}, status=500)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            n = params.get("max_new_tokens") or body.get("max_tokens")
            return await self._stream(request, api, n, fate)
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, api: str, n: int, fate: str) -> web.StreamResponse:
        lmi = api == "lmi"
        resp = web.StreamResponse(
            headers={"Content-Type": "application/jsonlines" if lmi else "text/event-stream"}
        )
        await resp.prepare(request)
        frame = jl if lmi else sse_frame
        if fate == "hang":
            for _ in range(100):  # until the client gives up
                await asyncio.sleep(0.02)
                if request.transport is None or request.transport.is_closing():
                    break
            return resp
        emit = n - 1 if fate == "short" else n
        for i in range(emit):
            await asyncio.sleep(self.delay)
            if fate == "in_band" and i == 2:
                await resp.write(frame(LMI_ERROR_LINE if lmi else {"error": {"message": "boom"}}))
                return resp
            await resp.write(frame(server_event(api, i, i == emit - 1)))
        if api in ("completions", "chat"):
            await resp.write(b"data: [DONE]\n\n")
        return resp


def sse_frame(obj: object) -> bytes:
    return sse(obj, done=False)


def server_event(api: str, i: int, last: bool) -> dict:
    if api == "lmi":
        return lmi_tok(i) | ({"generated_text": "text"} if last else {})
    if api == "tgi":
        return tgi_event(i, last)
    if api == "completions":
        return completion_chunk(f" w{i}", "length" if last else None)
    return {
        "choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": "length" if last else None}]
    }


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeServer, str]]:
    server, loop = FakeServer(), asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/models", server.models)
    for path in ("/invocations", "/generate_stream", "/v1/completions", "/v1/chat/completions"):
        app.router.add_post(path, server.generate)
    runner = web.AppRunner(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def start() -> None:
        await runner.setup()
        await web.SockSite(runner, sock).start()

    loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def every(n: int, *fates: tuple[int, str]) -> str:
    """Request n's fate: the first (modulus, fate) that divides n, else ok."""
    return next((fate for mod, fate in fates if n % mod == 0), "ok")


def test_closed_loop_against_fake_server_counts_errors(fake: tuple[FakeServer, str]) -> None:
    server, url = fake
    server.reset(plan=lambda n: "hang" if n == 3 else every(n, (5, "in_band"), (7, "http500"), (9, "short")))
    cfg = BenchConfig(url=url, api="lmi", num_requests=20, max_new_tokens=8, timeout_s=0.5, warmup=0)
    prompts = PromptSource(5, 20, seed=0)
    started = time.perf_counter()
    api = asyncio.run(resolve_api(cfg))
    row = asyncio.run(run_row(cfg, api, prompts, "closed", 4))
    assert time.perf_counter() - started < 5
    assert (row["requests"], row["completed"], row["errors"]) == (20, 11, 9)
    assert row["error_kinds"] == {"http_500": 2, "in_band": 4, "short": 2, "timeout": 1}
    assert row["output_tokens"] == 11 * 8
    assert row["max_in_flight"] == 4
    assert server.max_in_flight <= 4
    assert row["ttft_ms"]["p50"] > 0
    assert row["itl_ms"]["p99"] >= row["itl_ms"]["p50"] > 0


def test_open_loop_against_fake_server(fake: tuple[FakeServer, str]) -> None:
    server, url = fake
    server.reset(plan=lambda n: every(n, (4, "in_band"), (10, "http500")))
    cfg = BenchConfig(
        url=url, api="openai-completions", num_requests=20, max_new_tokens=6, timeout_s=2, warmup=0
    )
    cfg.max_concurrency = 3
    started = time.perf_counter()
    api = asyncio.run(resolve_api(cfg))
    assert cfg.model == "fake-model"
    row = asyncio.run(run_row(cfg, api, PromptSource(5, 20, seed=0), "open", 100.0))
    assert time.perf_counter() - started < 5
    assert (row["requests"], row["completed"], row["errors"]) == (20, 14, 6)
    assert row["error_kinds"] == {"http_500": 1, "in_band": 5}
    assert row["mode"] == "open"
    assert row["rate"] == 100.0
    assert row["concurrency"] is None
    assert 1 <= server.max_in_flight <= 3


@pytest.mark.parametrize("api", ["lmi", "openai-completions", "openai-chat", "tgi"])
def test_cli_rows_and_json_line(
    fake: tuple[FakeServer, str], api: str, capsys: pytest.CaptureFixture
) -> None:
    server, url = fake
    server.reset()
    argv = ["--url", url + "/", "--api", api, "--concurrency", "1", "3", "--num-requests", "6"]
    argv += ["--max-new-tokens", "5", "--prompt-len-min", "5", "--prompt-len-max", "30", "--timeout", "5"]
    assert run(build_parser().parse_args(argv)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    data = json.loads(lines[-1])
    assert data["schema"] == report.SCHEMA
    assert data["baseline"] is None
    assert [r["concurrency"] for r in data["rows"]] == [1, 3]
    assert all(r["completed"] == 6 and r["errors"] == 0 and r["output_tokens"] == 30 for r in data["rows"])
    assert set(data["rows"][0]) >= {"requests_per_min", "output_tokens_per_s", "ttft_ms", "itl_ms", "e2e_ms"}
    assert "TTFT ms" in lines[0]
    if api == "tgi":
        # the fake rejects the field, as validating servers do
        assert data["config"]["tgi_ignore_eos"] == "off"


def test_cli_unreachable_server_fails_fast(capsys: pytest.CaptureFixture) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here now
    started = time.perf_counter()
    assert run(build_parser().parse_args(["--url", f"http://127.0.0.1:{port}", "--timeout", "2"])) == 1
    assert time.perf_counter() - started < 3
    assert "warm-up request" in capsys.readouterr().err
    bad = build_parser().parse_args(["--prompt-len-min", "50", "--prompt-len-max", "10"])
    assert run(bad) == 2


# --- baseline and report -----------------------------------------------------------------------------


def test_baseline_measure_and_ratio_in_report() -> None:
    calls: list[tuple[str, int]] = []

    def generate(prompt: str, new_tokens: int) -> int:
        calls.append((prompt, new_tokens))
        time.sleep(0.01)
        return new_tokens

    base = measure(generate, ["a", "b", "c"], max_new_tokens=16)
    assert calls[0] == ("a", 2)
    assert [c[1] for c in calls[1:]] == [16, 16, 16]
    assert base["requests"] == 3
    assert base["output_tokens"] == 48
    assert base["requests_per_min"] > 0
    base |= {"model": "m", "dtype": "float32", "device": "cpu", "requests_per_min": 10.0}
    rows = [{"mode": "closed", "concurrency": 8, "rate": None} | summarize([], 1.0)]
    rows[0]["requests_per_min"] = 25.0
    report.add_baseline_ratios(rows, base)
    assert rows[0]["vs_baseline"] == 2.5
    text = report.table(rows, base)
    assert "2.50x" in text
    assert "baseline (HF generate" in text


def test_cli_import_is_light() -> None:
    code = (
        "import sys, argparse, serving.bench.cli as c;"
        "c.add_parser(argparse.ArgumentParser().add_subparsers());"
        "bad = [m for m in ('torch', 'transformers', 'aiohttp') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
