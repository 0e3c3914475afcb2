"""`lmi container test`: the checks a deploy needs to pass, against a running container's URL.

Every API dialect once (LMI, OpenAI completions and chat, TGI), streaming included; with the container
at hand also that PID 1 is the server itself (so SIGTERM reaches it) and that SIGTERM drains: a stream
in flight finishes with its final event and the container exits 0 within 30 s.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import requests
from docker.models.containers import Container

DRAIN_S = 30


class CheckFailed(Exception):
    """One check's expectation did not hold; the message says what was seen."""


def expect(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _post(url: str, path: str, body: dict, stream: bool = False) -> requests.Response:
    return requests.post(f"{url}{path}", json=body, timeout=120, stream=stream)


def _lines(resp: requests.Response) -> list[str]:
    return [line for line in resp.iter_lines(decode_unicode=True) if line]


def check_ping(url: str) -> str:
    resp = requests.get(f"{url}/ping", timeout=10)
    expect(resp.status_code == 200, f"status {resp.status_code}")
    return "200"


def check_lmi(url: str) -> str:
    resp = _post(
        url, "/invocations", {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}}
    )
    expect(resp.status_code == 200, f"status {resp.status_code}: {resp.text[:200]}")
    return repr(resp.json()["generated_text"][:40])


def check_lmi_stream(url: str) -> str:
    body = {"inputs": "Count: one, two,", "parameters": {"max_new_tokens": 8}, "stream": True}
    lines = _lines(_post(url, "/invocations", body, stream=True))
    expect(len(lines) >= 2, f"{len(lines)} jsonlines")
    expect("generated_text" in json.loads(lines[-1]), f"last line {lines[-1][:120]}")
    return f"{len(lines)} jsonlines"


def check_openai(url: str) -> str:
    resp = _post(url, "/v1/completions", {"prompt": "Hello", "max_tokens": 8})
    expect(resp.status_code == 200, f"status {resp.status_code}: {resp.text[:200]}")
    return f"{resp.json()['usage']['completion_tokens']} tokens"


def check_openai_chat_stream(url: str) -> str:
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "stream": True}
    lines = _lines(_post(url, "/v1/chat/completions", body, stream=True))
    expect(lines and lines[-1] == "data: [DONE]", f"last event {lines[-1:]}")
    return f"{len(lines)} events"


def check_tgi(url: str) -> str:
    resp = _post(url, "/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 8}})
    expect(resp.status_code == 200, f"status {resp.status_code}: {resp.text[:200]}")
    return repr(resp.json()["generated_text"][:40])


def check_invocation(url: str) -> str:
    resp = _post(url, "/invocations", {"inputs": "hello"})
    expect(resp.status_code == 200, f"status {resp.status_code}: {resp.text[:200]}")
    return resp.text[:60]


def check_pid1(container: Container) -> str:
    code, out = container.exec_run(["cat", "/proc/1/cmdline"])
    argv = out.decode(errors="replace").split("\0")
    expect(code == 0, f"exec failed: {out[:200]!r}")
    expect(any(arg.endswith("serve") for arg in argv) and not argv[0].endswith("sh"), f"PID 1 is {argv}")
    return " ".join(a for a in argv if a)


def check_sigterm_drain(container: Container, url: str) -> str:
    """A stream in flight when SIGTERM arrives still ends with its final event; then the exit is 0."""
    body = {
        "inputs": "Write a long story.",
        "parameters": {"max_new_tokens": 48, "ignore_eos": True},
        "stream": True,
    }
    lines: list[str] = []
    first = threading.Event()

    def consume() -> None:
        with _post(url, "/invocations", body, stream=True) as resp:
            for line in resp.iter_lines(decode_unicode=True):
                if line:
                    lines.append(line)
                    first.set()

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    expect(first.wait(60), "no token within 60 s")
    started = time.monotonic()
    container.kill(signal="SIGTERM")
    reader.join(DRAIN_S)
    code, took = exit_code(container, started + DRAIN_S + 5), time.monotonic() - started
    expect(lines and "generated_text" in json.loads(lines[-1]), f"stream cut after {len(lines)} lines")
    expect(took <= DRAIN_S, f"exited after {took:.1f} s")
    expect(code == 0, f"exit code {code}")
    return f"stream finished ({len(lines)} lines), exit 0 after {took:.1f} s"


def exit_code(container: Container, deadline: float) -> int | None:
    """The container's exit code once it has exited (None past ``deadline``). Polls its state instead of
    the engine's blocking wait: podman's wait endpoint kept this 2-core machine so busy that a stream in
    flight slowed from 20 ms to over a second a token."""
    while time.monotonic() < deadline:
        container.reload()
        if container.status in ("exited", "dead"):
            return container.attrs["State"]["ExitCode"]
        time.sleep(0.5)
    return None


def run_checks(url: str, container: Container | None = None, generation: bool = True,
               sigterm: bool = True) -> list[Check]:  # fmt: skip
    """Each check in order; the SIGTERM drain is last, since it stops the container."""
    checks: list[tuple[str, Callable[[], str]]] = [("ping", lambda: check_ping(url))]
    if generation:
        checks += [
            ("LMI /invocations", lambda: check_lmi(url)),
            ("LMI streaming", lambda: check_lmi_stream(url)),
            ("OpenAI /v1/completions", lambda: check_openai(url)),
            ("OpenAI chat streaming", lambda: check_openai_chat_stream(url)),
            ("TGI /generate", lambda: check_tgi(url)),
        ]
    else:
        checks.append(("/invocations", lambda: check_invocation(url)))
    if container is not None:
        checks.append(("PID 1 is the server", lambda: check_pid1(container)))
        if sigterm:
            checks.append(("SIGTERM drains", lambda: check_sigterm_drain(container, url)))
    results = []
    for name, check in checks:
        try:
            results.append(Check(name, True, check()))
        except (CheckFailed, requests.RequestException, ValueError, KeyError) as exc:
            results.append(Check(name, False, str(exc) or type(exc).__name__))
    return results
