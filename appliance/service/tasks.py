"""Task names and the task models that serve them (distillation): which names a tenant's request may
give in its `model` field, and the promoted LoRA adapters loaded into the engine for them.

A name is a task when `[distill] tasks` or the tenant's own `tasks` list it, or a task model is
registered for it (`appliance distill promote`). Until a model is promoted for a tenant's task, the
task goes to the cloud and its answers are captured under its name; once one is, the service loads
its adapter into the engine (at start, and within `[distill] reload_s` of a promotion while running)
and answers the task under it when the confidence rule says confident.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.common.config import Config
from appliance.distill.export import read_answers
from appliance.distill.registry import Registry, TaskModel, open_registry
from appliance.engine.async_engine import AsyncEngine
from appliance.engine.grammar import answer_choices

log = logging.getLogger("appliance.service.tasks")


@dataclass(frozen=True)
class Serving:
    """A promoted task model loaded into the engine."""

    model: TaskModel
    adapter: int  # the engine's adapter id
    # a classification's known answers (the adapter records them) as token sequences: decoding keeps to them
    choices: tuple[tuple[int, ...], ...] = ()


class TaskModels:
    def __init__(self, cfg: Config, directory: Path, engine: AsyncEngine | None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.registry: Registry = open_registry(directory)
        self._serving: dict[tuple[str, str], Serving] = {}
        self._ids: dict[str, int] = {}  # adapter path -> engine id
        self._choices: dict[str, tuple[tuple[int, ...], ...]] = {}  # adapter path -> its answers, read once
        self._registered: dict[str, list[str]] = {}  # tenant -> tasks with a registered model
        self._models: dict[str, dict[str, TaskModel]] = {}  # tenant -> model name -> its registration
        self._version: tuple[int, float] | None = None
        self._checked = 0.0
        self._lock = asyncio.Lock()

    def close(self) -> None:
        self.registry.close()

    # ------------------------------------------------------------------ names

    def names(self, tenant: str) -> list[str]:
        """The task names `tenant` may send, in order: configured, then registered."""
        return list(dict.fromkeys([*self.cfg.tasks_for(tenant), *self._registered.get(tenant, [])]))

    def serving(self, tenant: str, task: str) -> Serving | None:
        return self._serving.get((tenant, task))

    def model_names(self, tenant: str) -> list[str]:
        """The task models registered for `tenant`, which a request may name itself."""
        return list(self._models.get(tenant, {}))

    async def named(self, tenant: str, name: str) -> Serving:
        """A registered task model asked for by its own name (promoted or not), its adapter loaded on
        first use. Raises LookupError when `tenant` has no such model or its adapter does not load."""
        m = self._models.get(tenant, {}).get(name)
        if m is None:
            raise LookupError(f"no task model '{name}' for tenant '{tenant}'")
        aid = self._ids.get(m.adapter)
        if aid is None:
            if self.engine is None:
                raise LookupError("no local engine to serve a task model")
            try:
                aid = await asyncio.to_thread(self.engine.load_adapter, m.adapter)
            except (OSError, ValueError, RuntimeError) as e:
                raise LookupError(f"task model '{name}' does not load: {e}") from None
            if self._ids.setdefault(m.adapter, aid) != aid:  # another request loaded it meanwhile
                self.engine.unload_adapter(aid)
            else:
                log.info("task model %s loaded on request (adapter %s)", name, m.adapter)
        return Serving(m, self._ids[m.adapter], self._answers(m.adapter))

    def _answers(self, adapter: str) -> tuple[tuple[int, ...], ...]:
        if adapter not in self._choices:
            self._choices[adapter] = self._read_answers(adapter)
        return self._choices[adapter]

    def _read_answers(self, adapter: str) -> tuple[tuple[int, ...], ...]:
        """The answers a task adapter was trained to choose among, tokenized (() for free text)."""
        engine = self.engine
        if engine is None:
            return ()
        try:
            answers = read_answers(adapter)
        except (OSError, ValueError) as e:
            log.warning(
                "task adapter %s: its known answers are unreadable, so its answers are not constrained: %s", adapter, e
            )
            return ()
        if not answers:
            return ()
        return answer_choices(engine, answers)

    def loaded(self) -> list[Serving]:
        return list(self._serving.values())

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Load the promoted adapters now (at start; blocking), unload those no longer promoted."""
        self._version = self.registry.version()
        self._checked = time.monotonic()
        registered: dict[str, list[str]] = {}
        models: dict[str, dict[str, TaskModel]] = {}
        for m in self.registry.models():
            registered.setdefault(m.tenant, []).append(m.task)
            models.setdefault(m.tenant, {})[m.name] = m
        self._models = models
        self._registered = {t: list(dict.fromkeys(tasks)) for t, tasks in registered.items()}
        want = {(m.tenant, m.task): m for m in self.registry.promoted()}
        serving: dict[tuple[str, str], Serving] = {}
        for key, m in want.items():
            aid = self._ids.get(m.adapter)
            if aid is None and self.engine is not None:
                try:
                    aid = self.engine.load_adapter(m.adapter)
                except (OSError, ValueError, RuntimeError) as e:
                    log.error("task model %s for %s/%s not loaded (its task goes to the cloud): %s", m.name, *key, e)
                    continue
                self._ids[m.adapter] = aid
            if aid is not None:
                serving[key] = Serving(m, aid, self._answers(m.adapter))
                before = self._serving.get(key)
                if before is None or before.model.name != m.name:
                    log.info("task model %s serves %s/%s (adapter %s)", m.name, key[0], key[1], m.adapter)
        used = {s.model.adapter for s in serving.values()}
        for path in [p for p in self._ids if p not in used]:
            aid = self._ids.pop(path)
            self._choices.pop(path, None)
            if self.engine is not None:
                self.engine.unload_adapter(aid)  # freed once its running requests finish
            log.info("adapter %s unloaded", path)
        self._serving = serving

    async def refresh(self) -> None:
        """Pick up promotions made while running (at most every `[distill] reload_s`)."""
        every = self.cfg.distill.reload_s
        if not every or time.monotonic() - self._checked < every or self._lock.locked():
            return
        async with self._lock:
            self._checked = time.monotonic()
            version = await asyncio.to_thread(self.registry.version)
            if version != self._version:
                await asyncio.to_thread(self.load)
