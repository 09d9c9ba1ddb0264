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
from appliance.distill.registry import Registry, TaskModel, open_registry
from appliance.engine.async_engine import AsyncEngine

log = logging.getLogger("appliance.service.tasks")


@dataclass(frozen=True)
class Serving:
    """A promoted task model loaded into the engine."""

    model: TaskModel
    adapter: int  # the engine's adapter id


class TaskModels:
    def __init__(self, cfg: Config, directory: Path, engine: AsyncEngine | None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.registry: Registry = open_registry(directory)
        self._serving: dict[tuple[str, str], Serving] = {}
        self._ids: dict[str, int] = {}  # adapter path -> engine id
        self._registered: dict[str, list[str]] = {}  # tenant -> tasks with a registered model
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

    def loaded(self) -> list[Serving]:
        return list(self._serving.values())

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Load the promoted adapters now (at start; blocking), unload those no longer promoted."""
        self._version = self.registry.version()
        self._checked = time.monotonic()
        registered: dict[str, list[str]] = {}
        for m in self.registry.models():
            registered.setdefault(m.tenant, []).append(m.task)
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
                serving[key] = Serving(m, aid)
                before = self._serving.get(key)
                if before is None or before.model.name != m.name:
                    log.info("task model %s serves %s/%s (adapter %s)", m.name, key[0], key[1], m.adapter)
        used = {s.model.adapter for s in serving.values()}
        for path in [p for p in self._ids if p not in used]:
            aid = self._ids.pop(path)
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
