#!/usr/bin/env bash
# Build the offline install bundle: one tar.gz holding a wheelhouse with every wheel the appliance
# needs (our package with its compiled extension, the compiled llama-cpp-python, all dependencies),
# the default model files with sha256 sums, the systemd unit, a default config, install.sh,
# uninstall.sh and the install docs. The target machine needs Python 3.11 with venv and nothing
# else: no compiler, no package index, no network.
#
# Usage: packaging/build-bundle.sh --python PY --llama-wheel WHL --models DIR --out DIR
# (`make bundle` passes the right values; see docs/install.md)
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
PY="" LLAMA_WHEEL="" MODELS="" OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY="$2"; shift 2 ;;
        --llama-wheel) LLAMA_WHEEL="$2"; shift 2 ;;
        --models) MODELS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "build-bundle.sh: unknown argument $1" >&2; usage 2 ;;
    esac
done
for v in PY LLAMA_WHEEL MODELS OUT; do
    [ -n "${!v}" ] || { echo "build-bundle.sh: --$(echo "$v" | tr 'A-Z_' 'a-z-') is required" >&2; exit 2; }
done
[ -f "$LLAMA_WHEEL" ] || { echo "build-bundle.sh: no llama-cpp-python wheel at $LLAMA_WHEEL" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("'"$ROOT"'/pyproject.toml", "rb"))["project"]["version"])')
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
NAME="appliance-$VERSION-linux-x86_64"
STAGE="$OUT/$NAME"
rm -rf "$STAGE" "$OUT/$NAME.tar.gz"
mkdir -p "$STAGE/wheelhouse" "$STAGE/models" "$STAGE/systemd" "$STAGE/config" "$STAGE/docs"

echo "== our wheel (compiled extension; links ggml/llama from llama_cpp/lib)"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -C build-dir="$OUT/native-build" -w "$STAGE/wheelhouse" "$ROOT"
OUR_WHEEL=$(ls "$STAGE"/wheelhouse/appliance-"$VERSION"-*.whl)
if unzip -p "$OUR_WHEEL" 'appliance/_native*.so' > "$OUT/_native.so" && \
   nm -D --undefined-only "$OUT/_native.so" | grep -q 'ggml_backend_cpu_\|ggml_cpu_has_'; then
    echo "build-bundle.sh: appliance/_native links the CPU backend directly; it cannot load with GGML_BACKEND_DL" >&2
    exit 1
fi
cp "$LLAMA_WHEEL" "$STAGE/wheelhouse/"

echo "== every dependency as a wheel (built here when only an sdist exists), the training stack included"
# constraints without the two packages given as files (pip refuses to constrain a file requirement)
grep -v -E '^(llama-cpp-python|appliance)==' "$ROOT/constraints.txt" > "$OUT/constraints-deps.txt"
# --no-cache-dir: a wheel cached from an earlier build may have been compiled for this CPU only.
# HNSWLIB_NO_NATIVE: hnswlib's setup.py adds -march=native otherwise (AVX-512 code from a build
# machine that has it, SIGILL on an AVX2-only server).
HNSWLIB_NO_NATIVE=1 "$PY" -m pip wheel -q --no-cache-dir -c "$OUT/constraints-deps.txt" -w "$STAGE/wheelhouse" \
    "$OUR_WHEEL[train]" "$STAGE/wheelhouse/$(basename "$LLAMA_WHEEL")"

# requirements.txt: exactly the wheels in the wheelhouse, so install.sh's resolver has no choice
for whl in "$STAGE"/wheelhouse/*.whl; do
    base=$(basename "$whl")
    echo "${base%%-*}==$(echo "$base" | cut -d- -f2)" | tr '_' '-'
done | sort -u > "$STAGE/requirements.txt"

echo "== models (verified against the manifest)"
"$PY" - "$ROOT/models/manifest.toml" "$MODELS" "$STAGE/models" <<'PYEOF'
import hashlib, shutil, sys, tomllib
from pathlib import Path
manifest, src, dst = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
for m in tomllib.loads(manifest.read_text())["models"]:
    if not m.get("default"):
        continue
    f = src / m["file"]
    h = hashlib.sha256()
    with f.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    if f.stat().st_size != m["size"] or h.hexdigest() != m["sha256"]:
        sys.exit(f"build-bundle.sh: {f} does not match the manifest's size/sha256; run `appliance models pull`")
    shutil.copyfile(f, dst / m["file"])
    print(f"   {m['file']} {m['size']} bytes sha256 {m['sha256'][:12]}...")
PYEOF

cp "$ROOT/systemd/appliance.service" "$STAGE/systemd/"
cp "$ROOT/packaging/appliance.toml" "$STAGE/config/appliance.toml"
cp "$ROOT/packaging/install.sh" "$ROOT/packaging/uninstall.sh" "$STAGE/"
cp "$ROOT/docs/install.md" "$STAGE/docs/"
chmod 0755 "$STAGE/install.sh" "$STAGE/uninstall.sh"
printf 'version=%s\npython=%s\n' "$VERSION" "$PYVER" > "$STAGE/BUNDLE"

(cd "$STAGE" && find . -type f -printf '%P\n' | LC_ALL=C sort | xargs sha256sum) > "$OUT/SHA256SUMS"
mv "$OUT/SHA256SUMS" "$STAGE/SHA256SUMS"
tar -C "$OUT" -czf "$OUT/$NAME.tar.gz" "$NAME"
rm -rf "$STAGE" "$OUT/_native.so" "$OUT/constraints-deps.txt"
echo "bundle: $OUT/$NAME.tar.gz ($(du -h "$OUT/$NAME.tar.gz" | cut -f1))"
