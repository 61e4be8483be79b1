"""An HTTP client for a vLLM (OpenAI-compatible) teacher server.

One pooled ``httpx.Client`` per server: connections are kept alive and reused,
every request has a timeout, and failures that are worth retrying (connection
refused or dropped, timeouts, HTTP 5xx) are retried a bounded number of times
with exponential backoff, while a 4xx (our request is wrong) fails at once. A
cancel lands between attempts and during backoff, so a run never sits in a
retry loop after the user pressed Stop. Errors name the URL and carry the
server's own message.

The teacher's distribution is read through vLLM's *token-id* outputs:
``prompt_logprobs`` is keyed by token id, whereas the OpenAI ``top_logprobs``
field is keyed by decoded strings, so two tokens that decode to the same text
collide and one is silently lost. Prompts are sent as token ids, so the server
never re-tokenizes text differently from the student.

Where the API key may go: ``teacher.url`` comes from a run config, which may be shared,
while the key (``$FOUNDRY_VLLM_API_KEY``) is the operator's. So the client sends the key
only to a loopback server (``127.0.0.0/8``, ``::1``, ``localhost``; http or https), or
to a host the operator lists in ``$FOUNDRY_VLLM_KEY_HOSTS`` (comma-separated ``host`` or
``host:port``; an environment variable, never the config) and then only over https:
never over plain http to a non-loopback host. Otherwise the key is withheld (a warning
says why, and a 401 from that server names the fix). Redirects are not followed, so a
server cannot forward the key elsewhere either, and requests to a loopback server ignore
``$HTTP_PROXY`` (a proxy would receive the key and could not reach our loopback anyway).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from foundry_kernel.errors import TeacherServerError
from foundry_kernel.teachers._targets import SparseTargets

log = logging.getLogger("foundry.teacher_client")
RETRYABLE = (httpx.TransportError,)  # connect/read/write errors, timeouts, dropped connections
KEY_HOSTS_ENV = "FOUNDRY_VLLM_KEY_HOSTS"
DEFAULT_PORTS = {"http": 80, "https": 443}


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP literal (127.0.0.0/8, ::1); other names may resolve
    anywhere, so they are not loopback however they look (``127.0.0.1.example``)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def key_hosts(raw: str | None = None) -> frozenset[str]:
    """The operator's allow-list (``$FOUNDRY_VLLM_KEY_HOSTS``): lower-case ``host`` or
    ``host:port`` entries, separated by commas or spaces."""
    text = os.environ.get(KEY_HOSTS_ENV, "") if raw is None else raw
    return frozenset(e.strip().lower() for e in text.replace(",", " ").split() if e.strip())


def key_refusal(url: str, allowed: frozenset[str] | None = None) -> str | None:
    """Why the API key must not be sent to ``url``, or None when it may be.

    Parsed with httpx, the library that will connect, so the decision is about the host
    the request really goes to (``http://127.0.0.1@evil.example`` goes to evil.example).
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"{url!r} is not a valid URL ({exc})"
    scheme, host = parsed.scheme.lower(), parsed.host.lower()
    if scheme not in DEFAULT_PORTS or not host:
        return f"{url!r} is not an http(s) URL with a host"
    if is_loopback_host(host):
        return None
    if scheme != "https":
        return (
            f"{host} is not a loopback host and the URL is plain http (the key would travel "
            "in clear text); use https and list the host in $" + KEY_HOSTS_ENV
        )
    port = parsed.port or DEFAULT_PORTS[scheme]
    names = allowed if allowed is not None else key_hosts()
    if host in names or f"{host}:{port}" in names:
        return None
    return (
        f"{host} is not a loopback host and not in ${KEY_HOSTS_ENV}; the operator (not the "
        f"config) allows it with {KEY_HOSTS_ENV}={host}"
    )


@dataclass(frozen=True)
class RetryPolicy:
    """How hard the client tries before failing a request."""

    retries: int = 3  # attempts after the first
    backoff_s: float = 0.5  # first wait; doubles each time
    max_backoff_s: float = 8.0
    timeout_s: float = 120.0  # per request (read); connecting gets connect_timeout_s
    connect_timeout_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * 2**attempt, self.max_backoff_s)


class TeacherClient:
    """Talks to one vLLM server: top-k prompt log-probabilities and generation.

    ``check`` is called before every attempt (it raises to cancel); ``wait(s)``
    sleeps for a backoff and returns early (True) when the run was asked to stop.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        policy: RetryPolicy | None = None,
        check: Callable[[], None] | None = None,
        wait: Callable[[float], bool] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.policy = policy or RetryPolicy()
        self._check = check or (lambda: None)
        self._wait = wait or _sleep
        # Why the key was not sent (None: sent, or there is none); see the module docstring.
        self.key_withheld = key_refusal(self.base_url) if api_key else None
        if self.key_withheld:
            log.warning("not sending the API key to %s: %s", self.base_url, self.key_withheld)
        send_key = api_key and self.key_withheld is None
        headers = {"Authorization": f"Bearer {api_key}"} if send_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            follow_redirects=False,  # a redirect must not carry the key to another host
            # $HTTP_PROXY would carry a loopback server's key to the proxy (which cannot
            # reach our loopback anyway); other hosts may need the operator's proxy.
            trust_env=not is_loopback_host(httpx.URL(self.base_url).host),
            timeout=httpx.Timeout(self.policy.timeout_s, connect=self.policy.connect_timeout_s),
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
            transport=transport,
        )
        self._model = model
        self.retried = 0  # attempts that failed and were retried (for reports and tests)

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self.base_url}{path}"
        attempt = 0
        while True:
            self._check()
            try:
                response = self._http.request(method, path, json=body)
            except RETRYABLE as exc:
                problem = f"{type(exc).__name__}: {exc}"
                status = None
            else:
                if response.status_code < 400:
                    return response.json()
                problem = _server_message(response)
                status = response.status_code
                if status == 401 and self.key_withheld:
                    problem += f" (the API key was not sent: {self.key_withheld})"
                if status < 500:
                    raise TeacherServerError(
                        f"teacher server {url} refused the request (HTTP {status}): {problem}",
                        url=url,
                        status=status,
                    )
            if attempt >= self.policy.retries:
                raise TeacherServerError(
                    f"teacher server {url} failed after {attempt + 1} attempts: {problem}",
                    url=url,
                    status=status,
                )
            delay = self.policy.delay(attempt)
            log.warning("teacher server %s: %s; retrying in %.1f s", url, problem, delay)
            self.retried += 1
            attempt += 1
            if self._wait(delay):
                self._check()  # raises the run's cancel/timeout
                raise TeacherServerError(f"stopped while retrying {url}", url=url)

    def model(self) -> str:
        """The served model's name (the first one the server lists)."""
        if self._model is None:
            listing = self._request("GET", "/v1/models")
            names = [m.get("id") for m in listing.get("data", [])]
            if not names:
                raise TeacherServerError(f"{self.base_url}/v1/models lists no model")
            self._model = str(names[0])
        return self._model

    # ------------------------------------------------------------------ teacher API
    def prompt_topk(self, prompts: Sequence[Sequence[int]], k: int) -> list[SparseTargets]:
        """For each prompt of n token ids: the teacher's top-k over the next token at
        positions 0..n-2 (position t describes token t+1) plus log p of the true token.

        One request per batch of prompts; vLLM returns ``prompt_logprobs[i]`` = the
        distribution of token i given tokens < i (None for i = 0).
        """
        if not prompts:
            return []
        body = {
            "model": self.model(),
            "prompt": [list(map(int, p)) for p in prompts],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": k,
            "return_tokens_as_token_ids": True,
        }
        reply = self._request("POST", "/v1/completions", body)
        choices = sorted(reply.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(prompts):
            raise TeacherServerError(
                f"{self.base_url} answered {len(choices)} choices for {len(prompts)} prompts"
            )
        return [
            _parse_prompt_logprobs(c.get("prompt_logprobs"), p, k, self.base_url)
            for c, p in zip(choices, prompts, strict=True)
        ]

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[list[int]]:
        """Token ids the teacher generates after each prompt (ids, not text: no re-tokenizing)."""
        if not prompts:
            return []
        body: dict[str, Any] = {
            "model": self.model(),
            "prompt": [list(map(int, p)) for p in prompts],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        if seed is not None:
            body["seed"] = seed
        reply = self._request("POST", "/v1/completions", body)
        choices = sorted(reply.get("choices", []), key=lambda c: c.get("index", 0))
        return [_generated_ids(c, self.base_url) for c in choices]


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def _server_message(response: httpx.Response) -> str:
    """The server's own error text (vLLM: {"error": {"message": ...}} or {"message": ...})."""
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(payload, dict):
        err = payload.get("error", payload)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
    return str(payload)[:500]


def _token_id(key: str | int, base_url: str) -> int:
    """vLLM keys prompt_logprobs by token id (as a JSON string); with
    return_tokens_as_token_ids the decoded form is 'token_id:123'."""
    text = str(key)
    if text.startswith("token_id:"):
        text = text[len("token_id:") :]
    try:
        return int(text)
    except ValueError as exc:
        raise TeacherServerError(f"{base_url} returned a non-id logprob key {key!r}") from exc


def _parse_prompt_logprobs(
    entries: list[dict[str, Any] | None] | None, prompt: Sequence[int], k: int, base_url: str
) -> SparseTargets:
    n = len(prompt)
    if entries is None or len(entries) != n:
        got = "none" if entries is None else len(entries)
        raise TeacherServerError(
            f"{base_url} returned {got} prompt_logprobs for a {n}-token prompt; is this a vLLM "
            "server with prompt_logprobs support?"
        )
    ids = torch.zeros(max(n - 1, 0), k, dtype=torch.long)
    values = torch.full((max(n - 1, 0), k), -math.inf)
    label = torch.zeros(max(n - 1, 0))
    for pos in range(1, n):
        entry = entries[pos] or {}
        ranked = []
        true_lp = None
        for key, info in entry.items():
            tok = _token_id(key, base_url)
            lp = float(info["logprob"] if isinstance(info, dict) else info)
            rank = info.get("rank") if isinstance(info, dict) else None
            if tok == int(prompt[pos]):
                true_lp = lp
            ranked.append((rank if rank is not None else math.inf, -lp, tok, lp))
        # vLLM adds the true token to the top-k when it ranks lower; keep exactly the top k.
        ranked.sort()
        top = ranked[:k]
        if len(top) < k:
            raise TeacherServerError(
                f"{base_url} returned {len(top)} logprobs at position {pos}, asked for {k}; "
                "start the server with --max-logprobs >= k"
            )
        for j, (_, _, tok, lp) in enumerate(top):
            ids[pos - 1, j] = tok
            values[pos - 1, j] = lp
        label[pos - 1] = true_lp if true_lp is not None else -math.inf
    return SparseTargets(ids.unsqueeze(0), values.unsqueeze(0), label.unsqueeze(0))


def _generated_ids(choice: dict[str, Any], base_url: str) -> list[int]:
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if tokens is None:
        ids = choice.get("token_ids")
        if ids is None:
            raise TeacherServerError(f"{base_url} returned no token ids for a generation")
        return [int(t) for t in ids]
    return [_token_id(t, base_url) for t in tokens]
