"""`make fuzz`'s Python half: coverage-guided fuzzing (libFuzzer through atheris) of the targets in
tests/fuzz_targets.py -- every input a user or client controls.

    python tests/fuzz_run.py [--runs N] [--max-time S] [--seeds K] [--out DIR] [TARGET ...]

Per target (default: all), in a process of its own: the appliance's modules are instrumented for
coverage, the corpus is seeded with K documents drawn (deterministically) from the target's
hypothesis strategy and with the regression inputs of past findings (tests/data/fuzz/TARGET/), and
libFuzzer runs N executions (default 100,000) of mutated inputs, each with a 10 s timeout and a
2 GiB RSS limit. A finding (any exception other than the target's own error, a hang, memory growth)
lands in DIR/findings/py-TARGET-* (DIR: build/fuzz unless --out); keep it as
tests/data/fuzz/TARGET/NAME once fixed, and `make test` replays it. The summary (executions, exec/s,
coverage, findings per target) goes to DIR/py-summary.json. Exit status 1 when anything was found.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REGRESSIONS = HERE / "data" / "fuzz"


def seed(target: str, corpus: Path, count: int) -> int:
    """Write `count` documents drawn from the target's strategy (derandomized: the same every run)
    and its regression inputs into `corpus`; returns how many files it holds."""
    from fuzz_targets import TARGETS
    from hypothesis import HealthCheck, given, settings

    corpus.mkdir(parents=True, exist_ok=True)
    drawn: list[bytes] = []
    if count > 0:
        opts = settings(
            max_examples=count,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )

        def keep(data: bytes) -> None:
            drawn.append(data)

        opts(given(TARGETS[target].strategy)(keep))()
    drawn += [p.read_bytes() for p in sorted((REGRESSIONS / target).glob("*"))]
    for data in drawn:
        (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)
    return sum(1 for _ in corpus.iterdir())


def child(target: str, libfuzzer_args: list[str]) -> None:
    """Run inside the fuzzing process: instrument, then hand control to libFuzzer (never returns)."""
    import gc
    import tomllib  # noqa: F401  (msgspec.toml's parser, imported lazily: loaded now to be instrumented)

    import atheris
    from fuzz_targets import TARGETS

    # the appliance's functions (and the TOML parser's), instrumented in place: the editable install
    # imports through a custom loader, which atheris' import hook skips, and instrument_all() would
    # spend minutes on every library loaded
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and str(obj.__module__).startswith(("appliance", "tomllib")):
            atheris.instrument_func(obj)
    run = TARGETS[target].run
    atheris.Setup([sys.argv[0], *libfuzzer_args], run)
    atheris.Fuzz()


def fuzz(target: str, runs: int, max_time: int, seeds: int, out: Path) -> dict[str, object]:
    corpus = out / "py-corpus" / target
    n_seeds = seed(target, corpus, seeds)
    findings = out / "findings"
    findings.mkdir(parents=True, exist_ok=True)
    before = set(findings.iterdir())
    args = [
        f"-runs={runs}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-max_len=16384",
        "-print_final_stats=1",
        f"-artifact_prefix={findings}/py-{target}-",
        str(corpus),
    ]
    if max_time:
        args.insert(1, f"-max_total_time={max_time}")
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, __file__, "--child", target, "--", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
        cwd=HERE,
    )
    wall = time.monotonic() - t0
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", p.stdout) or re.search(r"Done (\d+) runs", p.stdout)
    execs = int(m.group(1)) if m else 0
    cov = re.findall(r"\bcov: (\d+) ft: (\d+)", p.stdout)
    new = sorted(str(f) for f in set(findings.iterdir()) - before)
    log = out / f"py-{target}.log"
    log.write_text(p.stdout)
    row = {
        "target": target,
        "executions": execs,
        "seconds": round(wall, 1),
        "exec_per_s": round(execs / wall) if wall else 0,
        "seed_inputs": n_seeds,
        "coverage_edges": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "exit_status": p.returncode,
        "findings": new,
    }
    print(
        f"{target}: {execs:,} executions in {wall:.0f} s ({row['exec_per_s']} exec/s), "
        f"coverage {row['coverage_edges']} edges, {len(new)} findings, exit {p.returncode} (log: {log})",
        flush=True,
    )
    return row


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sep = sys.argv.index("--")
        child(sys.argv[2], sys.argv[sep + 1 :])
        return 0
    sys.path.insert(0, str(HERE))
    from fuzz_targets import TARGETS

    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("target", nargs="*", help=f"targets to run: {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--runs", type=int, default=100_000, help="executions per target (default 100,000)")
    ap.add_argument("--max-time", type=int, default=0, help="stop a target after this many seconds (0: no limit)")
    ap.add_argument("--seeds", type=int, default=200, help="seed documents drawn per target (default 200)")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "fuzz", help="work folder (default build/fuzz)")
    a = ap.parse_args()
    targets = a.target or list(TARGETS)
    if unknown := [t for t in targets if t not in TARGETS]:
        ap.error(f"unknown target {', '.join(unknown)}; expected some of {', '.join(TARGETS)}")
    if a.runs < 1:
        ap.error(f"--runs must be at least 1, got {a.runs}")
    rows = [fuzz(t, a.runs, a.max_time, a.seeds, a.out) for t in targets]
    summary = a.out / "py-summary.json"  # one row per target, the latest run of each
    old = json.loads(summary.read_text())["targets"] if summary.exists() else []
    keep = [r for r in old if r["target"] not in targets]
    summary.write_text(json.dumps({"targets": keep + rows}, indent=2))
    return 1 if any(r["findings"] or r["exit_status"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
