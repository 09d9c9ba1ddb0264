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
from typing import Any, TypeVar

from appliance.engine.chunk import Chunk, Decoder, Event
from appliance.engine.core import EngineCore
from appliance.engine.early_exit import ExitCalibration
from appliance.engine.sampling import SamplingOptions

T = TypeVar("T")


@dataclass
class _Submit:
    prompt: list[int]
    options: SamplingOptions
    tenant: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event | BaseException]
    reply: Future[int]
    adapter: int = 0


@dataclass
class _Cancel:
    request_id: int


@dataclass
class _Call:
    """Run `fn` on the engine thread (the native engine is single-threaded) and hand back its result."""

    fn: Callable[[], Any]
    reply: Future[Any]


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
        gpu_layers: int = -1,
        early_exit: bool = True,
        draft_max: int = 8,
    ) -> None:
        """early_exit: load the model's early-exit calibration when it has one (requests then choose
        SamplingOptions.early_exit); draft_max: most tokens a lossless round drafts."""
        self.core = EngineCore(
            model_path,
            kv_cache_mb=kv_cache_mb,
            n_blocks=n_blocks,
            block_size=block_size,
            max_batched_tokens=max_batched_tokens,
            max_seqs=max_seqs,
            n_threads=n_threads,
            use_gpu=use_gpu,
            gpu_layers=gpu_layers,
            early_exit=early_exit,
            draft_max=draft_max,
        )
        self.model = self.core.model
        self.vocab = self.core.vocab
        self.exit_calibration: ExitCalibration | None = self.core.exit_calibration
        self._native = self.core.native
        self._commands: queue.SimpleQueue[_Submit | _Cancel | _Call | _Nothing | None] = queue.SimpleQueue()
        self._streams: dict[int, _Submit] = {}
        self._stats: dict[str, Any] = dict(self._native.stats())
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="appliance-engine", daemon=True)
        self._thread.start()

    @property
    def max_seq_len(self) -> int:
        return self.core.max_seq_len

    @property
    def block_size(self) -> int:
        """Tokens per KV block: the prefix cache reuses whole blocks only."""
        return int(self._stats["block_size"])

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """parse_special=True reads control tokens written as text (<start_of_turn>, ...) as such."""
        return self.core.tokenize(text, add_special=add_special, parse_special=parse_special)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], *, add_assistant: bool = True) -> str:
        return self.core.apply_chat_template(messages, add_assistant=add_assistant)

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
        self,
        prompt: str | bytes | Sequence[int],
        options: SamplingOptions | None = None,
        *,
        tenant: str = "",
        adapter: int = 0,
    ) -> AsyncIterator[Chunk]:
        """Stream the continuation of `prompt` under a loaded adapter (`load_adapter`'s id) or none
        (0); leaving the loop early cancels the request."""
        tokens, opts = self.core.prepare(prompt, options)
        if self._closed:
            raise RuntimeError("engine is closed")
        loop = asyncio.get_running_loop()
        sub = _Submit(tokens, opts, tenant, loop, asyncio.Queue(), Future(), adapter)
        self._commands.put(sub)
        try:
            request_id = await asyncio.wrap_future(sub.reply)
        except asyncio.CancelledError:
            # cancelled while the engine thread takes the submission: it is dropped there, or, when the
            # thread had already started it, cancelled as soon as its id is known
            sub.reply.add_done_callback(self._cancel_submitted)
            raise
        decoder = Decoder(self.vocab, opts.stop)
        ended = False  # the native request finished (else it is cancelled on the way out)
        try:
            while not decoder.done:
                ev = await sub.events.get()
                if isinstance(ev, BaseException):
                    raise ev
                ended = bool(ev.finish_reason)
                for chunk in decoder.chunks(ev):
                    yield chunk
        finally:
            if not ended:
                self._commands.put(_Cancel(request_id))

    def _cancel_submitted(self, reply: Future[int]) -> None:
        if not reply.cancelled() and reply.exception() is None:
            self._commands.put(_Cancel(reply.result()))

    def load_adapter(self, path: str | os.PathLike[str], scale: float = 1.0) -> int:
        """Load a LoRA adapter (llama.cpp GGUF) while serving; its id goes to `generate(adapter=)`."""
        return self._call(lambda: self.core.load_adapter(path, scale))

    def unload_adapter(self, adapter: int) -> bool:
        """Free it now (True) or when its running requests finish (False); new requests are refused."""
        return self._call(lambda: self.core.unload_adapter(adapter))

    def adapters(self) -> list[dict[str, Any]]:
        """The loaded adapters: id, path, scale, rank, bytes, the requests using it."""
        return self._call(lambda: list(self._native.adapters()))

    def save_prefix(self, tokens: Sequence[int], path: str | os.PathLike[str], *, tenant: str = "") -> int:
        """Write the cached K/V of the full blocks starting `tokens` (a system prompt, say) to `path`, so a
        restarted engine can `load_prefix` it; returns the tokens saved (0 if none are cached)."""
        return self._call(lambda: int(self._native.save_prefix(list(tokens), tenant=tenant, path=os.fspath(path))))

    def load_prefix(self, path: str | os.PathLike[str]) -> int:
        """Load a saved prefix into the prefix cache; returns the tokens loaded."""
        return self._call(lambda: int(self._native.load_prefix(os.fspath(path))))

    def _call(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise RuntimeError("engine is closed")
        reply: Future[T] = Future()
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
        if isinstance(cmd, _Call | _Submit) and not cmd.reply.set_running_or_notify_cancel():
            return  # its caller gave up waiting (a cancelled submit never reaches the native engine)
        if isinstance(cmd, _Call):
            try:
                cmd.reply.set_result(cmd.fn())
            except Exception as e:
                cmd.reply.set_exception(e)
            return
        if isinstance(cmd, _Submit):
            try:
                rid = self.core.submit(cmd.prompt, cmd.options, cmd.tenant, cmd.adapter)
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
            ev = Event.of(native_ev)
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
    def _post(sub: _Submit, item: Event | BaseException) -> bool:
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
