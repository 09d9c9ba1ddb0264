"""`appliance report`: totals and savings per tenant and period from the ledger, and a PNG chart.

Savings are counted against the configured cloud model (the counterfactual), by technique:
  semantic cache  requests answered from the cache: their whole counterfactual cost
  local model     requests run locally: counterfactual minus actual, less the summarization part
  summarization   prompt tokens that history summarization kept out of the prompt, at the input price
  prefix cache    prompt tokens whose KV was reused (tokens; locally this saves time, not money)
  early exit      tokens decoded with early exit (tokens; 0 until early exit lands)
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from appliance.common.config import PricingConfig

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


class Report(msgspec.Struct, kw_only=True):
    currency: str
    cloud_model: str
    period: str
    lines: list[Line]


def build_report(
    ledger: Path, pricing: PricingConfig, period: str, tenant: str | None = None, since: float = 0.0
) -> Report:
    fmt = _PERIODS[period]
    bucket = "'all'" if fmt == "all" else f"strftime('{fmt}', ts, 'unixepoch', 'localtime')"
    sql = (
        f"SELECT tenant, {bucket} AS p, route, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost),"
        " SUM(counterfactual_cost), SUM(summary_saved_tokens), SUM(cached_tokens), SUM(early_exit_tokens)"
        " FROM requests WHERE ts >= ?" + (" AND tenant = ?" if tenant else "") + " GROUP BY tenant, p, route"
    )
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        rows = conn.execute(sql, (since, tenant) if tenant else (since,)).fetchall()
    finally:
        conn.close()
    lines: dict[tuple[str, str], Line] = {}
    for t, p, route, n, pt, ct, cost, cf, summ, cached, early in rows:
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
        elif route == "local":
            line.saved_local_model += cf - cost - by_summary
    return Report(
        currency=pricing.currency,
        cloud_model=pricing.cloud_model,
        period=period,
        lines=[lines[k] for k in sorted(lines)],
    )


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
