"""`appliance report`: totals and savings per tenant and period from the ledger, and a PNG chart.

Savings are counted against the configured cloud model (the counterfactual), by technique:
  semantic cache  requests answered from the cache: their whole counterfactual cost
  local model     requests run locally: counterfactual minus actual, less the summarization part
  summarization   prompt tokens that history summarization kept out of the prompt, at the input price
  prefix cache    prompt tokens whose KV was reused (tokens; locally this saves time, not money)
  early exit      tokens decoded with early exit (tokens; 0 until early exit lands)

A task model's local answer that did not pass its confidence rule (sent only because no cloud could
take it) is not counted as a saving. Per task (requests that named one): requests, the share answered
locally, the share of those that passed the confidence rule, and the accuracy where known: the
held-out covered_exact_match of the task model serving it (`appliance distill eval`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from appliance.common.config import PricingConfig
from appliance.distill.registry import Registry

_PERIODS = {"day": "%Y-%m-%d", "week": "%Y-W%W", "month": "%Y-%m", "all": "all"}


class Line(msgspec.Struct, kw_only=True):
    tenant: str
    period: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    counterfactual_cost: float = 0.0
    saved_semantic_cache: float = 0.0
    saved_local_model: float = 0.0
    saved_summarization: float = 0.0
    prefix_cache_tokens: int = 0
    early_exit_tokens: int = 0

    @property
    def saved(self) -> float:
        return self.counterfactual_cost - self.cost


class TaskLine(msgspec.Struct, kw_only=True):
    tenant: str
    task: str
    requests: int = 0
    local: int = 0
    cloud: int = 0
    confident: int = 0  # local answers that passed the task model's confidence rule
    local_share: float = 0.0
    model: str = ""  # the task model serving it now ("" when none is promoted)
    accuracy: float | None = None  # its held-out covered_exact_match, where known


class Report(msgspec.Struct, kw_only=True):
    currency: str
    cloud_model: str
    period: str
    lines: list[Line]
    tasks: list[TaskLine] = msgspec.field(default_factory=list)


def build_report(
    ledger: Path,
    pricing: PricingConfig,
    period: str,
    tenant: str | None = None,
    since: float = 0.0,
    tasks_db: Path | None = None,
) -> Report:
    fmt = _PERIODS[period]
    bucket = "'all'" if fmt == "all" else f"strftime('{fmt}', ts, 'unixepoch', 'localtime')"
    where = " FROM requests WHERE ts >= ?" + (" AND tenant = ?" if tenant else "")
    args = (since, tenant) if tenant else (since,)
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        has_tasks = "confident" in {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
        unsure = "COALESCE(confident, 1) = 0" if has_tasks else "0"
        sql = (
            f"SELECT tenant, {bucket} AS p, route, {unsure} AS unsure, COUNT(*), SUM(prompt_tokens),"
            " SUM(completion_tokens), SUM(cost), SUM(counterfactual_cost), SUM(summary_saved_tokens),"
            " SUM(cached_tokens), SUM(early_exit_tokens)" + where + " GROUP BY tenant, p, route, unsure"
        )
        rows = conn.execute(sql, args).fetchall()
        task_rows = []
        if has_tasks:
            task_rows = conn.execute(
                "SELECT tenant, task, COUNT(*), SUM(route = 'local'), SUM(route = 'cloud'), SUM(confident = 1)"
                + where
                + " AND task != '' GROUP BY tenant, task ORDER BY tenant, task",
                args,
            ).fetchall()
    finally:
        conn.close()
    lines: dict[tuple[str, str], Line] = {}
    for t, p, route, not_sure, n, pt, ct, cost, cf, summ, cached, early in rows:
        line = lines.setdefault((t, p), Line(tenant=t, period=p))
        line.requests += n
        line.prompt_tokens += pt
        line.completion_tokens += ct
        line.cost += cost
        line.counterfactual_cost += cf
        line.prefix_cache_tokens += cached
        line.early_exit_tokens += early
        by_summary = summ * pricing.input_per_mtok / 1e6
        line.saved_summarization += by_summary
        if route == "cache":
            line.saved_semantic_cache += cf - cost
        elif route == "local" and not not_sure:
            line.saved_local_model += cf - cost - by_summary
        elif route == "local":  # a task model's unsure answer, sent for want of a cloud: no saving
            line.counterfactual_cost -= cf - cost
    return Report(
        currency=pricing.currency,
        cloud_model=pricing.cloud_model,
        period=period,
        lines=[lines[k] for k in sorted(lines)],
        tasks=_task_lines(task_rows, tasks_db),
    )


def _task_lines(rows: list[tuple[str, str, int, int, int, int | None]], tasks_db: Path | None) -> list[TaskLine]:
    serving = {}
    if tasks_db is not None and tasks_db.is_file() and rows:
        with Registry(tasks_db) as reg:
            serving = {(m.tenant, m.task): m for m in reg.promoted()}
    out = []
    for t, task, n, local, cloud, confident in rows:
        m = serving.get((t, task))
        out.append(
            TaskLine(
                tenant=t,
                task=task,
                requests=n,
                local=int(local or 0),
                cloud=int(cloud or 0),
                confident=int(confident or 0),
                local_share=(local or 0) / n if n else 0.0,
                model=m.name if m is not None else "",
                accuracy=m.figures.covered_exact_match if m is not None else None,
            )
        )
    return out


def format_report(rep: Report, *, as_json: bool = False) -> str:
    if as_json:
        return msgspec.json.format(msgspec.json.encode(rep)).decode()
    c = rep.currency
    out = [f"usage and savings against {rep.cloud_model} ({c}), per {rep.period}"]
    head = f"{'tenant':<12} {'period':<10} {'reqs':>6} {'tokens in':>10} {'out':>8} {'cost':>10} {'cloud':>10}"
    head += f" {'saved':>10} {'cache':>9} {'local':>9} {'summary':>9} {'prefix tok':>10}"
    out.append(head)
    for ln in rep.lines:
        out.append(
            f"{ln.tenant:<12} {ln.period:<10} {ln.requests:>6} {ln.prompt_tokens:>10} {ln.completion_tokens:>8}"
            f" {ln.cost:>10.4f} {ln.counterfactual_cost:>10.4f} {ln.saved:>10.4f} {ln.saved_semantic_cache:>9.4f}"
            f" {ln.saved_local_model:>9.4f} {ln.saved_summarization:>9.4f} {ln.prefix_cache_tokens:>10}"
        )
    if not rep.lines:
        out.append("(no requests in the ledger for this selection)")
    if rep.tasks:
        out.append("")
        out.append(
            f"{'tenant':<12} {'task':<20} {'reqs':>6} {'local':>6} {'share':>6} {'sure':>6} {'accuracy':>8}  model"
        )
        for tl in rep.tasks:
            acc = f"{tl.accuracy:>8.3f}" if tl.accuracy is not None else f"{'-':>8}"
            out.append(
                f"{tl.tenant:<12} {tl.task:<20} {tl.requests:>6} {tl.local:>6} {tl.local_share:>6.2f}"
                f" {tl.confident:>6} {acc}  {tl.model or '(cloud)'}"
            )
    return "\n".join(out)


def write_chart(rep: Report, path: Path) -> None:
    """Stacked bars per tenant and period: actual cost, and the savings by technique up to the cloud cost."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("the PNG chart needs matplotlib (pip install matplotlib)") from e
    labels = [f"{ln.tenant}\n{ln.period}" for ln in rep.lines]
    series = [
        ("actual cost", [ln.cost for ln in rep.lines]),
        ("saved: semantic cache", [ln.saved_semantic_cache for ln in rep.lines]),
        ("saved: local model", [ln.saved_local_model for ln in rep.lines]),
        ("saved: summarization", [ln.saved_summarization for ln in rep.lines]),
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) + 2), 4.5), dpi=100)
    bottom = [0.0] * len(labels)
    for name, values in series:
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel(rep.currency)
    ax.set_title(f"cost and savings against {rep.cloud_model}, per {rep.period}")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
