"""`make fuzz`'s native half: seeds, sanitizer build, regression replay, then fuzzing each harness.

    python native/fuzz/run.py [--runs N] [--max-time S] [--replay-only] [HARNESS ...]

HARNESS is gguf, lora, vocab or prefix (default: all). Steps: seed corpora from generated tiny
models (seeds.py, into build/fuzz/work), ggml's GGUF reader compiled with the sanitizers too when its
sources are at hand ($APPLIANCE_GGML_SRC or build/fuzz/ggml-src: vendor/llama.cpp/ggml of the pinned
llama-cpp-python sdist), the
harnesses built with ASan+UBSan (build.sh: libFuzzer with clang, else g++ and driver.cpp), then per
harness a replay of the regression corpus native/fuzz/corpus/HARNESS (every input a past finding)
and N executions (default 1,000,000) of mutated inputs. Findings land in build/fuzz/findings/;
the summary (executions, exec/s, findings per harness) in build/fuzz/summary.json. Exit status 1
when anything was found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "native" / "fuzz"
BUILD = ROOT / "build" / "fuzz"
HARNESSES = ("gguf", "lora", "vocab", "prefix")


def ggml_sources() -> Path | None:
    """ggml's source tree of the pinned llama-cpp-python (vendor/llama.cpp/ggml of its sdist):
    $APPLIANCE_GGML_SRC, else build/fuzz/ggml-src; None (ggml's GGUF reader uninstrumented) without."""
    for tree in (os.environ.get("APPLIANCE_GGML_SRC"), BUILD / "ggml-src"):
        if tree and (Path(tree) / "src" / "gguf.cpp").exists():
            return Path(tree)
    print("fuzz: no ggml sources (APPLIANCE_GGML_SRC); ggml's GGUF reader runs uninstrumented", file=sys.stderr)
    return None


def build(driver: bool) -> str:
    cmd = [str(HERE / "build.sh"), "--out", str(BUILD / "bin"), "--python", sys.executable]
    src = ggml_sources()
    if src is not None:
        cmd += ["--ggml-src", str(src)]
    if driver:
        cmd.append("--driver")
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out, end="")
    return out.strip().splitlines()[-1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["APPLIANCE_FUZZ_DIR"] = str(BUILD / "work")
    e.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
    e.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
    return e


def replay(h: str) -> None:
    """Every regression input (and seed) once; a finding that came back fails here."""
    dirs = [str(d) for d in (HERE / "corpus" / h, BUILD / "work" / "seeds" / h) if d.is_dir() and any(d.iterdir())]
    files = [str(p) for d in dirs for p in sorted(Path(d).iterdir())]
    subprocess.run([str(BUILD / "bin" / f"fuzz_{h}"), *files], check=True, env=env(), capture_output=True)
    print(f"{h}: replayed {len(files)} regression and seed inputs: clean")


def fuzz(h: str, runs: int, max_time: int) -> dict[str, object]:
    corpus = BUILD / "corpus" / h
    corpus.mkdir(parents=True, exist_ok=True)
    for d in (HERE / "corpus" / h, BUILD / "work" / "seeds" / h):
        for p in d.glob("*") if d.is_dir() else ():
            (corpus / p.name).write_bytes(p.read_bytes())
    findings = BUILD / "findings"
    findings.mkdir(parents=True, exist_ok=True)
    before = set(findings.iterdir())
    args = [
        str(BUILD / "bin" / f"fuzz_{h}"),
        f"-runs={runs}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={findings}/{h}-",
        str(corpus),
    ]
    if max_time:
        args.insert(2, f"-max_total_time={max_time}")
    t0 = time.monotonic()
    p = subprocess.run(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    wall = time.monotonic() - t0
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", p.stdout) or re.search(r"Done (\d+) runs", p.stdout)
    execs = int(m.group(1)) if m else 0
    new = sorted(str(f) for f in set(findings.iterdir()) - before)
    (BUILD / f"{h}.log").write_text(p.stdout)
    row = {
        "harness": h,
        "executions": execs,
        "seconds": round(wall, 1),
        "exec_per_s": round(execs / wall),
        "exit_status": p.returncode,
        "findings": new,
    }
    print(
        f"{h}: {execs:,} executions in {wall:.0f} s ({execs / wall:.0f} exec/s), "
        f"{len(new)} findings, exit {p.returncode} (log: {BUILD / f'{h}.log'})"
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("harness", nargs="*", help=f"harnesses to run: {', '.join(HARNESSES)} (default: all)")
    ap.add_argument("--runs", type=int, default=1_000_000, help="executions per harness (default 1,000,000)")
    ap.add_argument("--max-time", type=int, default=0, help="stop a harness after this many seconds (0: no limit)")
    ap.add_argument("--replay-only", action="store_true", help="build and replay the regression corpora only")
    ap.add_argument("--driver", action="store_true", help="build with g++ and driver.cpp even where clang exists")
    a = ap.parse_args()
    harnesses = a.harness or list(HARNESSES)
    if unknown := [h for h in harnesses if h not in HARNESSES]:
        ap.error(f"unknown harness {', '.join(unknown)}; expected some of {', '.join(HARNESSES)}")
    if not (BUILD / "work" / "base.gguf").exists():
        subprocess.run([sys.executable, str(HERE / "seeds.py"), str(BUILD / "work")], check=True)
    mode = build(a.driver)
    for h in harnesses:
        replay(h)
    if a.replay_only:
        return 0
    rows = [fuzz(h, a.runs, a.max_time) for h in harnesses]
    summary = BUILD / "summary.json"  # one row per harness, the latest run of each
    old = json.loads(summary.read_text())["harnesses"] if summary.exists() else []
    keep = [r for r in old if r["harness"] not in harnesses]
    summary.write_text(json.dumps({"mode": mode, "harnesses": keep + rows}, indent=2))
    return 1 if any(r["findings"] or r["exit_status"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
