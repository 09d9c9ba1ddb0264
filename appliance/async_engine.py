"""Continuous batching for asyncio callers.

    engine = AsyncEngine(model_path, kv_cache_mb=256, max_seqs=16)
    async for chunk in engine.generate("Hello", SamplingOptions(temperature=0), tenant="acme"):
        ...
    engine.close()

One engine thread owns the native BatchEngine: it takes submissions and cancellations from a
queue, runs `step()` (schedule -> one batched forward pass -> sample; the GIL is released while it
computes) and hands each request's new tokens to its caller's event loop. A caller that stops
iterating (client gone, deadline, stop string) cancels its request, which frees its KV blocks at
once. Prompt prefixes are reused across requests of the same tenant through the prefix cache.

Early exit (SamplingOptions.early_exit) needs the model's calibration (`appliance models
calibrate-exit`), stored next to the model file and loaded here when present.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from appliance import _native
from appliance.early_exit import ExitCalibration, load_calibration
from appliance.engine import (
    Chunk,
    ContextOverflowError,
    DecodeStats,
    default_threads,
    eog_tokens,
    render_chat,
    to_utf8,
)
from appliance.sampling import SamplingOptions
from appliance.textstream import TextStream


@dataclass(frozen=True)
class _Event:
    tokens: list[int]
    finish_reason: str
    n_prompt: int
    n_cached: int
    layers_run: int = 0
    drafted: int = 0
    accepted: int = 0
    exit_layers: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()  # per token, when the request asked (SamplingOptions.logprobs)
    entropies: tuple[float, ...] = ()


class _Tally:
    """A request's decode statistics, summed over its events."""

    def __init__(self) -> None:
        self.tokens = self.layers = self.drafted = self.accepted = 0
        self.exits: dict[int, int] = {}

    def add(self, ev: _Event) -> None:
        self.tokens += len(ev.exit_layers)
        self.layers += ev.layers_run
        self.drafted += ev.drafted
        self.accepted += ev.accepted
        for at in ev.exit_layers:
            self.exits[at] = self.exits.get(at, 0) + 1

    def stats(self) -> DecodeStats:
        return DecodeStats(self.tokens, self.layers, self.drafted, self.accepted, tuple(sorted(self.exits.items())))


@dataclass
class _Submit:
    prompt: list[int]
    options: SamplingOptions
    tenant: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[_Event | BaseException]
    reply: Future[int]


@dataclass
class _Cancel:
    request_id: int


@dataclass
class _Call:
    """Run `fn` on the engine thread (the native engine is single-threaded) and hand back its result."""

    fn: Callable[[], int]
    reply: Future[int]


class AsyncEngine:
    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        kv_cache_mb: int = 256,
        n_blocks: int = 0,
        block_size: int = 16,
        max_batched_tokens: int = 512,
        max_seqs: int = 16,
        n_threads: int | None = None,
        use_gpu: bool = True,
        early_exit: bool = True,
        draft_max: int = 8,
    ) -> None:
        """early_exit: load the model's early-exit calibration when it has one (requests then choose
        SamplingOptions.early_exit); draft_max: most tokens a lossless round drafts."""
        n_threads = default_threads() if n_threads is None else n_threads
        if n_threads <= 0:
            raise ValueError(f"n_threads must be positive, got {n_threads}")
        path = os.fspath(model_path)
        self.model = _native.Model(path, use_gpu=use_gpu)
        self.vocab = _native.Vocab(path)
        eog = eog_tokens(self.vocab)
        self.exit_calibration: ExitCalibration | None = load_calibration(path) if early_exit else None
        cal = self.exit_calibration
        self._native = _native.BatchEngine(
            self.model,
            kv_cache_mb=kv_cache_mb,
            n_blocks=n_blocks,
            block_size=block_size,
            max_batched_tokens=max_batched_tokens,
            max_seqs=max_seqs,
            n_threads=n_threads,
            eog_tokens=eog,
            model_key=path,
            exit_layers=cal.exit_layers if cal else [],
            exit_thresholds=cal.thresholds if cal else [],
            draft_exit_layer=cal.draft_exit_layer if cal else 0,
            draft_max=draft_max,
        )
        if cal is not None:
            self._native.set_shortlist(cal.shortlist)
        self._commands: queue.SimpleQueue[_Submit | _Cancel | _Call | _Nothing | None] = queue.SimpleQueue()
        self._streams: dict[int, _Submit] = {}
        self._stats: dict[str, Any] = dict(self._native.stats())
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="appliance-engine", daemon=True)
        self._thread.start()

    @property
    def max_seq_len(self) -> int:
        return int(self._native.max_seq_len)

    @property
    def block_size(self) -> int:
        """Tokens per KV block: the prefix cache reuses whole blocks only."""
        return int(self._stats["block_size"])

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """parse_special=True reads control tokens written as text (<start_of_turn>, ...) as such."""
        return list(self.vocab.tokenize(to_utf8(text), add_special=add_special, parse_special=parse_special))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, add_assistant: bool = True) -> str:
        return render_chat(self.vocab, self.model.arch, messages, add_assistant=add_assistant)

    def stats(self) -> dict[str, Any]:
        """Block pool, prefix cache and scheduler counters as of the last step."""
        return dict(self._stats)

    @property
    def busy(self) -> bool:
        """Were requests running or waiting at the last step? (From the snapshot: safe from any thread.)"""
        s = self._stats
        return bool(s["n_running"] or s["n_waiting"])

    def check_invariants(self) -> str:
        """Block-pool invariants ('' when they hold); call when the engine is idle."""
        return str(self._native.check_invariants())

    async def generate(
        self, prompt: str | bytes | Sequence[int], options: SamplingOptions | None = None, *, tenant: str = ""
    ) -> AsyncIterator[Chunk]:
        """Stream the continuation of `prompt`; leaving the loop early cancels the request."""
        opts = options or SamplingOptions()
        opts.validate()
        if opts.early_exit != "off" and self.exit_calibration is None:
            raise ValueError(
                f"early_exit={opts.early_exit!r} needs the model's early-exit calibration: "
                "run `appliance models calibrate-exit` for it"
            )
        tokens = self.tokenize(prompt) if isinstance(prompt, str | bytes) else [int(t) for t in prompt]
        if not tokens:
            raise ValueError("prompt is empty")
        if len(tokens) >= self.max_seq_len:
            raise ContextOverflowError(
                f"prompt of {len(tokens)} tokens is too long: the longest sequence is {self.max_seq_len} tokens"
            )
        if self._closed:
            raise RuntimeError("engine is closed")
        loop = asyncio.get_running_loop()
        sub = _Submit(tokens, opts, tenant, loop, asyncio.Queue(), Future())
        self._commands.put(sub)
        request_id = await asyncio.wrap_future(sub.reply)
        stream = TextStream(opts.stop)
        tally = _Tally()
        finished = False
        try:
            while not finished:
                ev = await sub.events.get()
                if isinstance(ev, BaseException):
                    raise ev
                finished = bool(ev.finish_reason)
                tally.add(ev)
                for i, tok in enumerate(ev.tokens):
                    text = stream.push(self.vocab.token_to_piece(tok))
                    lp, ent = (ev.logprobs[i], ev.entropies[i]) if ev.logprobs else (None, None)
                    if stream.stopped:
                        yield Chunk(tok, text, "stop", ev.n_prompt, ev.n_cached, tally.stats(), lp, ent)
                        return
                    if finished and i == len(ev.tokens) - 1:
                        text += stream.finish()
                        yield Chunk(tok, text, ev.finish_reason, ev.n_prompt, ev.n_cached, tally.stats(), lp, ent)
                    else:
                        yield Chunk(tok, text, logprob=lp, entropy=ent)
                if finished and not ev.tokens:
                    yield Chunk(None, stream.finish(), ev.finish_reason, ev.n_prompt, ev.n_cached, tally.stats())
        finally:
            if not finished:
                self._commands.put(_Cancel(request_id))

    def save_prefix(self, tokens: Sequence[int], path: str | os.PathLike[str], *, tenant: str = "") -> int:
        """Write the cached K/V of the full blocks starting `tokens` (a system prompt, say) to `path`, so a
        restarted engine can `load_prefix` it; returns the tokens saved (0 if none are cached)."""
        return self._call(lambda: int(self._native.save_prefix(list(tokens), tenant=tenant, path=os.fspath(path))))

    def load_prefix(self, path: str | os.PathLike[str]) -> int:
        """Load a saved prefix into the prefix cache; returns the tokens loaded."""
        return self._call(lambda: int(self._native.load_prefix(os.fspath(path))))

    def _call(self, fn: Callable[[], int]) -> int:
        if self._closed:
            raise RuntimeError("engine is closed")
        reply: Future[int] = Future()
        self._commands.put(_Call(fn, reply))
        return reply.result()

    def close(self) -> None:
        """Stop the engine thread; requests still running end with an error."""
        if not self._closed:
            self._closed = True
            self._commands.put(None)
            self._thread.join()

    # ---- engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                # block while idle; otherwise only take what is queued before the next step
                cmd: _Submit | _Cancel | _Call | _Nothing | None = self._commands.get(block=self._native.idle)
            except queue.Empty:
                cmd = _NOTHING
            while not isinstance(cmd, _Nothing):
                if cmd is None:
                    self._fail_all(RuntimeError("engine closed"))
                    return
                self._handle(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = _NOTHING
                    self._stats = dict(self._native.stats())
            if not self._native.idle:
                self._step()

    def _handle(self, cmd: _Submit | _Cancel | _Call) -> None:
        if isinstance(cmd, _Call):
            try:
                cmd.reply.set_result(cmd.fn())
            except Exception as e:
                cmd.reply.set_exception(e)
            return
        if isinstance(cmd, _Submit):
            o = cmd.options
            try:
                rid = int(
                    self._native.submit(
                        cmd.prompt,
                        max_tokens=o.max_tokens,
                        temperature=o.temperature,
                        top_k=o.top_k,
                        top_p=o.top_p,
                        min_p=o.min_p,
                        repeat_penalty=o.repeat_penalty,
                        repeat_last_n=o.repeat_last_n,
                        seed=o.seed,
                        tenant=cmd.tenant,
                        exit_mode=o.early_exit,
                        exit_threshold=o.exit_threshold,
                        logprobs=o.logprobs,
                    )
                )
            except (ValueError, RuntimeError) as e:
                cmd.reply.set_exception(e)
                return
            self._streams[rid] = cmd
            cmd.reply.set_result(rid)
        elif isinstance(cmd, _Cancel):
            self._native.cancel(cmd.request_id)
            self._streams.pop(cmd.request_id, None)

    def _step(self) -> None:
        try:
            events = self._native.step()
        except Exception as e:  # a failed pass fails the requests in it, never the thread
            self._fail_all(e)
            return
        self._stats = dict(self._native.stats())
        for native_ev in events:
            sub = self._streams.get(native_ev.id)
            if sub is None:
                continue
            if native_ev.finish_reason:
                del self._streams[native_ev.id]
            ev = _Event(
                list(native_ev.tokens),
                native_ev.finish_reason,
                native_ev.n_prompt,
                native_ev.n_prompt_cached,
                native_ev.layers_run,
                native_ev.n_drafted,
                native_ev.n_accepted,
                tuple(native_ev.exit_layers),
                tuple(native_ev.logprobs),
                tuple(native_ev.entropies),
            )
            if not self._post(sub, ev):  # its caller's event loop has closed: nobody will read it
                self._native.cancel(native_ev.id)
                self._streams.pop(native_ev.id, None)
        self._stats = dict(self._native.stats())

    def _fail_all(self, error: BaseException) -> None:
        for rid, sub in list(self._streams.items()):
            self._native.cancel(rid)
            self._post(sub, error)
        self._streams.clear()

    @staticmethod
    def _post(sub: _Submit, item: _Event | BaseException) -> bool:
        """Hand an event to its caller's loop; False when that loop has closed (the caller left
        without its cancel arriving first, e.g. at asyncio.run's shutdown)."""
        try:
            sub.loop.call_soon_threadsafe(sub.events.put_nowait, item)
        except RuntimeError:
            return False
        return True


class _Nothing:
    """Sentinel: no command was waiting."""


_NOTHING = _Nothing()
