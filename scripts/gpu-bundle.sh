#!/usr/bin/env bash
# Builds the folder that scripts/gpu-check.sh runs on a GPU machine without a Rust toolchain
# or network: stripped release binaries and wgpu test binaries (xz-compressed), the Vulkan
# loader, and the benchmark configs. The folder must stay under 60 MB.
#
# Usage: scripts/gpu-bundle.sh OUT_DIR
# The wgpu build reuses REFORMER_WGPU_TARGET_DIR (default ~/.cache/reformer-wgpu-target), as
# .ci/run does; a first build there takes 12 to 25 minutes on 2 cores.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: scripts/gpu-bundle.sh OUT_DIR" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
out=$1
limit_mb=60
export CARGO_TARGET_DIR=${REFORMER_WGPU_TARGET_DIR:-$HOME/.cache/reformer-wgpu-target}

loader=$(ldconfig -p | awk '/libvulkan\.so\.1 .*x86-64/ { print $NF; exit }')
if [[ -z $loader ]]; then
    echo "error: no libvulkan.so.1 on this machine; install it with: apt-get install libvulkan1" >&2
    exit 1
fi
for tool in strip xz; do
    command -v "$tool" > /dev/null || { echo "error: $tool is missing; install binutils and xz-utils" >&2; exit 1; }
done

cd "$root"
cargo build --release --bins -p reformer-train -p reformer-infer --features reformer-train/wgpu,reformer-infer/wgpu
messages=$(mktemp)
trap 'rm -f "$messages"' EXIT
cargo test --release -p reformer-model -p reformer-infer --features reformer-infer/wgpu --no-run --message-format=json > "$messages"

# The executable of a test target, from cargo's JSON messages.
test_executable() {
    grep -F "\"name\":\"$1\",\"src_path\"" "$messages" | grep -F "\"kind\":[\"$2\"]" \
        | grep -o '"executable":"[^"]*"' | tail -n 1 | cut -d'"' -f4
}
model_tests=$(test_executable reformer_model lib)
infer_tests=$(test_executable wgpu test)
if [[ -z $model_tests || -z $infer_tests ]]; then
    echo "error: cargo did not report the reformer-model or wgpu test executables" >&2
    exit 1
fi

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
pack() {
    local source=$1 name=$2
    strip -o "$out/bin/$name" "$source"
    sha256sum "$out/bin/$name" | sed "s|$out/bin/||" >> "$out/SHA256SUMS"
    xz -9 -T0 "$out/bin/$name"
}
for binary in reformer-train reformer-infer reformer-bench; do
    pack "$CARGO_TARGET_DIR/release/$binary" "$binary"
done
pack "$model_tests" model-tests
pack "$infer_tests" infer-wgpu-tests
cp -L "$loader" "$out/lib/libvulkan.so.1"
cp assets/presets/bench-speed.json assets/presets/bench-enwik8.json "$out/"
{
    echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- . || echo ' (with uncommitted changes)')"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    echo "vulkan loader $(readlink -f "$loader")"
} > "$out/BUILD"

size_kb=$(du -sk "$out" | cut -f1)
echo "bundle $out: $((size_kb / 1024)) MB"
if (( size_kb > limit_mb * 1024 )); then
    echo "error: the bundle is $((size_kb / 1024)) MB, over the $limit_mb MB limit" >&2
    exit 1
fi
