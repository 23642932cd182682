"""What actually runs a Job on the reference Island: `echo` (a deterministic text
generator with realistic pacing), `openai` (forwards chat Jobs to any OpenAI-compatible
server: llama.cpp server, vLLM, Ollama) and `image` (a procedural PNG generator).

A backend gets a `JobContext` and calls `ctx.token(text)`, `ctx.progress(step, total)`
and `ctx.image(png, ...)` as output appears (the agent batches and sends them); it
returns the Job's usage, or raises `BackendError(reason, retryable)`. Cancellation is
plain asyncio task cancellation.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.island import Capabilities
from island.png import procedural_png

CHAT_MODELS = ["mistral-7b-instruct", "llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "tinyllama-1.1b-chat",
               "qwen2.5-0.5b-instruct"]
_TOKEN_RE = re.compile(r"\s*[\w']+|\s*[^\w\s]")
_VOCAB = ("the", "island", "archipelago", "tide", "harbour", "signal", "lantern", "current", "reef", "compass",
          "sail", "north", "quiet", "bright", "carries", "answers", "across", "every", "small", "light", "keeps",
          "over", "water", "voyage", "map", "shore", "wind", "calm", "stars", "route", "beacon", "drifts")


class BackendError(Exception):
    def __init__(self, reason: str, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class JobContext(Protocol):
    job_id: str
    cargo: str
    model: str
    kind: str
    input: dict[str, Any]

    def token(self, text: str) -> None: ...
    def progress(self, step: int, total: int) -> None: ...
    def image(self, png: bytes, *, width: int, height: int, seed: int, fmt: str = "png") -> None: ...


class Backend(Protocol):
    name: str
    kinds: frozenset[str]

    def default_capabilities(self) -> Capabilities: ...
    def warm_models(self) -> list[str]: ...
    async def run(self, job: JobContext) -> dict[str, int]: ...
    async def aclose(self) -> None: ...


def tokenize(text: str) -> list[str]:
    """Word-ish tokens with their leading space (joined they give the text back, modulo
    trailing whitespace)."""
    return _TOKEN_RE.findall(text)


def chat_messages(inp: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI-style messages from a chat Job's input (system prompt, history, prompt)."""
    out: list[dict[str, str]] = []
    if inp.get("system_prompt"):
        out.append({"role": "system", "content": str(inp["system_prompt"])})
    for m in inp.get("messages") or []:
        if isinstance(m, dict) and "content" in m:
            out.append({"role": str(m.get("role", "user")), "content": str(m["content"])})
    if inp.get("prompt"):
        out.append({"role": "user", "content": str(inp["prompt"])})
    return out


def prompt_token_count(inp: dict[str, Any]) -> int:
    return sum(len(tokenize(m["content"])) + 4 for m in chat_messages(inp))


async def _pace(start: float, n: int, per_s: float) -> None:
    """Sleep until `start + n / per_s` (an absolute schedule: no drift)."""
    if per_s <= 0:
        return
    delay = start + n / per_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


# ------------------------------------------------------------------ echo
@dataclass
class EchoBackend:
    """Deterministic replies: "Echo: <the prompt's first words>" then words drawn from a
    PRNG seeded by (model, prompt), `reply_tokens` tokens in all but never more than the
    Job's max_tokens; `tokens_per_s` pacing after `first_token_s`."""

    tokens_per_s: float = 50.0
    first_token_s: float = 0.05
    reply_tokens: int = 48
    slots: int = 4
    name: str = "echo"
    kinds: frozenset[str] = frozenset({"chat"})

    def default_capabilities(self) -> Capabilities:
        return Capabilities(cargos=["llm-chat", "llm-chat-lite"], models=list(CHAT_MODELS), vram_mb=24_576,
                            ram_mb=32_768, cpu_cores=8, gpu_model="echo", hardware_tier=2, slots=self.slots)

    def warm_models(self) -> list[str]:
        return list(CHAT_MODELS)

    @staticmethod
    def reply(model: str, inp: dict[str, Any], reply_tokens: int) -> list[str]:
        max_tokens = int(inp.get("max_tokens") or reply_tokens)
        n = max(0, min(max_tokens, reply_tokens))
        messages = chat_messages(inp)
        prompt = messages[-1]["content"] if messages else ""
        echoed = tokenize(prompt)[:16]
        if echoed and not echoed[0].startswith(" "):
            echoed[0] = " " + echoed[0]
        tokens = ["Echo", ":", *echoed]
        rng = random.Random(hashlib.sha256(f"{model}\x00{prompt}".encode()).digest())
        sentence = 0
        while len(tokens) < n:
            if sentence >= 5 and rng.random() < 0.2:
                tokens.append(".")
                sentence = 0
            else:
                tokens.append(" " + rng.choice(_VOCAB))
                sentence += 1
        return tokens[:n]

    async def run(self, job: JobContext) -> dict[str, int]:
        tokens = self.reply(job.model, job.input, self.reply_tokens)
        if self.first_token_s > 0:
            await asyncio.sleep(self.first_token_s)
        start = time.monotonic()
        for i, tok in enumerate(tokens):
            await _pace(start, i, self.tokens_per_s)
            job.token(tok)
        return {"prompt_tokens": prompt_token_count(job.input), "completion_tokens": len(tokens)}

    async def aclose(self) -> None:
        pass


@dataclass
class FlakyEchoBackend(EchoBackend):
    """`echo`, except that a Job whose last user message contains `fail_marker` fails the
    first time this Island sees that message (a non-retryable backend error, so the Job
    fails) and succeeds when it comes again: failure on demand, for Retry in tests."""

    fail_marker: str = "#fail"
    name: str = "flaky"
    _failed: set = field(default_factory=set)

    async def run(self, job: JobContext) -> dict[str, int]:
        messages = chat_messages(job.input)
        prompt = messages[-1]["content"] if messages else ""
        if self.fail_marker in prompt:
            key = hashlib.sha256(prompt.encode()).hexdigest()
            if key not in self._failed:
                self._failed.add(key)
                await asyncio.sleep(self.first_token_s)
                raise BackendError("the model crashed on this Island (flaky backend, on demand)", retryable=False)
        return await super().run(job)


# ------------------------------------------------------------------ image
@dataclass
class ImageBackend:
    """A procedural PNG, deterministic from (prompt, seed, steps, width, height), with a
    progress event per step at `steps_per_s`. Without a seed in the input, one is derived
    from the Job id (and reported, as a real generator would)."""

    steps_per_s: float = 40.0
    slots: int = 2
    name: str = "image"
    kinds: frozenset[str] = frozenset({"image"})

    def default_capabilities(self) -> Capabilities:
        return Capabilities(cargos=["sdxl"], models=["sdxl-base-1.0"], vram_mb=24_576, ram_mb=65_536, cpu_cores=16,
                            gpu_model="procedural", hardware_tier=3, slots=self.slots)

    def warm_models(self) -> list[str]:
        return ["sdxl-base-1.0"]

    @staticmethod
    def seed_for(job_id: str, inp: dict[str, Any]) -> int:
        seed = inp.get("seed")
        if isinstance(seed, int) and seed >= 0:
            return seed
        return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "big") & 0x7FFFFFFF

    async def run(self, job: JobContext) -> dict[str, int]:
        inp = job.input
        width, height = int(inp.get("width") or 1024), int(inp.get("height") or 1024)
        steps = max(1, int(inp.get("steps") or 30))
        seed = self.seed_for(job.job_id, inp)
        start = time.monotonic()
        for step in range(1, steps + 1):
            await _pace(start, step, self.steps_per_s)
            job.progress(step, steps)
        png = await asyncio.to_thread(procedural_png, str(inp.get("prompt", "")), seed, width, height, steps)
        job.image(png, width=width, height=height, seed=seed)
        return {"steps": steps}

    async def aclose(self) -> None:
        pass


# ------------------------------------------------------------------ openai
@dataclass
class OpenAIBackend:
    """Forwards chat Jobs to `{base_url}/v1/chat/completions` with `stream: true` and
    streams the deltas back; usage is the server's own (`stream_options.include_usage`),
    or counted when the server does not report it. `model` is the name the backend
    knows; None sends the Job's model name."""

    base_url: str
    model: str | None = None
    api_key: str | None = None
    models: list[str] = field(default_factory=lambda: list(CHAT_MODELS))
    cargos: list[str] = field(default_factory=lambda: ["llm-chat", "llm-chat-lite"])
    slots: int = 1
    timeout_s: float = 600.0
    name: str = "openai"
    kinds: frozenset[str] = frozenset({"chat"})
    _client: Any = None

    def default_capabilities(self) -> Capabilities:
        return Capabilities(cargos=list(self.cargos), models=list(self.models), vram_mb=8_192, ram_mb=16_384,
                            hardware_tier=1, slots=self.slots)

    def warm_models(self) -> list[str]:
        return list(self.models)

    def _url(self) -> str:
        base = self.base_url.rstrip("/")
        if base.endswith("/chat/completions"):
            return base
        return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")

    async def run(self, job: JobContext) -> dict[str, int]:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=10.0))
        inp = job.input
        body: dict[str, Any] = {"model": self.model or job.model, "messages": chat_messages(inp), "stream": True,
                                "stream_options": {"include_usage": True}}
        if inp.get("max_tokens"):
            body["max_tokens"] = int(inp["max_tokens"])
        if inp.get("temperature") is not None:
            body["temperature"] = float(inp["temperature"])
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        usage: dict[str, int] | None = None
        pieces = 0
        try:
            async with self._client.stream("POST", self._url(), json=body, headers=headers) as resp:
                if resp.status_code >= 400:
                    detail = (await resp.aread())[:300].decode(errors="replace")
                    raise BackendError(f"backend answered {resp.status_code}: {detail}",
                                       retryable=resp.status_code >= 500 or resp.status_code == 429)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        continue
                    if isinstance(chunk.get("usage"), dict):
                        u = chunk["usage"]
                        usage = {"prompt_tokens": int(u.get("prompt_tokens") or 0),
                                 "completion_tokens": int(u.get("completion_tokens") or 0)}
                    for choice in chunk.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            job.token(text)
                            pieces += 1
        except httpx.HTTPError as exc:
            raise BackendError(f"backend unreachable: {exc!r}", retryable=True) from None
        if usage is None:
            usage = {"prompt_tokens": prompt_token_count(inp), "completion_tokens": pieces}
        return usage

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


BACKENDS: dict[str, Callable[..., Backend]] = {"echo": EchoBackend, "image": ImageBackend,
                                               "openai": OpenAIBackend}  # type: ignore[dict-item]
