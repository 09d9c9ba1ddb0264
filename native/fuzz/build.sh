#!/usr/bin/env bash
# Builds the native fuzz harnesses into OUT (default build/fuzz/bin) with AddressSanitizer and
# UndefinedBehaviorSanitizer: with clang and libFuzzer when they are installed, else with g++ and
# native/fuzz/driver.cpp (the same LLVMFuzzerTestOneInput harnesses, replay and mutation without
# coverage feedback). Prints the mode it used ("libfuzzer" or "driver") as its last line.
#
#   native/fuzz/build.sh [--out DIR] [--python PY] [--ggml-src DIR] [--driver]
#
# --ggml-src: ggml's source tree (vendor/llama.cpp/ggml of the pinned llama-cpp-python sdist); when
# given, ggml's GGUF reader (src/gguf.cpp) is compiled in with the sanitizers too and takes the place
# of the uninstrumented copy in libggml-base. --driver: use g++ and the driver even where clang exists.
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
out="$root/build/fuzz/bin"
py="$root/.venv/bin/python"
ggml_src=""
force_driver=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --python) py="$2"; shift 2 ;;
        --ggml-src) ggml_src="$2"; shift 2 ;;
        --driver) force_driver=1; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

site="$("$py" -c 'import importlib.util, os; print(os.path.dirname(os.path.dirname(importlib.util.find_spec("llama_cpp").origin)))')"
lib="$site/llama_cpp/lib"
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined"
flags="-std=c++17 -O1 -g -fno-omit-frame-pointer $san -I$root/native/src -I$site/include"

mode=driver
cxx=g++
if [ "$force_driver" = 0 ] && command -v clang++ >/dev/null; then
    probe="$(mktemp -d)"
    printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long){return 0;}\n' >"$probe/p.cpp"
    if clang++ -fsanitize=fuzzer,address "$probe/p.cpp" -o "$probe/p" 2>/dev/null; then
        mode=libfuzzer
        cxx=clang++
    fi
    rm -rf "$probe"
fi
obj="$out/obj-$mode"
mkdir -p "$obj"
[ "$mode" = libfuzzer ] && flags="$flags -fsanitize=fuzzer-no-link"

# the core's sources (the Python bindings aside), recompiled when they or any header changed
sources=$(cd "$root/native/src" && ls *.cpp arch/*.cpp | grep -v '^bindings.cpp$')
newest_header=$(ls -t "$root"/native/src/*.h "$root"/native/src/arch/*.h | head -1)
todo=()
for s in $sources; do
    o="$obj/$(echo "$s" | tr / _).o"
    if [ ! -f "$o" ] || [ "$root/native/src/$s" -nt "$o" ] || [ "$newest_header" -nt "$o" ]; then
        todo+=("$s")
    fi
done
if [ -n "$ggml_src" ] && { [ ! -f "$obj/gguf.o" ] || [ "$ggml_src/src/gguf.cpp" -nt "$obj/gguf.o" ] || [ "$0" -nt "$obj/gguf.o" ]; }; then
    echo "compiling ggml's gguf.cpp from $ggml_src with the sanitizers"
    # -fno-sanitize=enum: gguf.cpp reads a file's type fields straight into its enums before checking
    # them (UB that every compiler leaves alone: the switch's default refuses the value); not ours to fix
    $cxx $flags -fno-sanitize=enum -I"$ggml_src/include" -I"$ggml_src/src" -c "$ggml_src/src/gguf.cpp" -o "$obj/gguf.o.tmp"
    mv "$obj/gguf.o.tmp" "$obj/gguf.o"
fi
if [ ${#todo[@]} -gt 0 ]; then
    echo "compiling ${#todo[@]} core sources with $cxx ($mode)"
    printf '%s\n' "${todo[@]}" | xargs -P "$(nproc)" -I{} sh -c \
        'o="$1/$(echo "$2" | tr / _).o"; '"$cxx $flags"' -c "$3/native/src/$2" -o "$o.tmp" && mv "$o.tmp" "$o"' _ "$obj" {} "$root"
fi
objs=$(ls "$obj"/*.o | grep -v '/gguf.o$' || true)  # (an interrupted compile leaves only a .tmp)
extra=""
[ -n "$ggml_src" ] && extra="$obj/gguf.o"
link="-L$lib -Wl,-rpath,$lib -lllama -lggml -lggml-base -lggml-cpu -lpthread"
for h in gguf lora vocab prefix; do
    src="$root/native/fuzz/fuzz_$h.cpp"
    if [ "$mode" = libfuzzer ]; then
        clang++ $flags -fsanitize=fuzzer "$src" $extra $objs $link -o "$out/fuzz_$h"
    else
        g++ $flags "$src" "$root/native/fuzz/driver.cpp" $extra $objs $link -o "$out/fuzz_$h"
    fi
done
echo "$mode"
