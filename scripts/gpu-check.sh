#!/usr/bin/env bash
# Runs the wgpu tests and the benchmarks of BENCHMARKS.md at GPU sizes on a machine with an
# NVIDIA GPU, no Rust toolchain and no network, from the folder scripts/gpu-bundle.sh builds.
# Prints a short table at the end and writes full results to RESULTS_DIR. Finishes in under
# 8 minutes: every stage has a time limit, and a stage that runs out is reported, not fatal.
#
# Usage: scripts/gpu-check.sh BUNDLE_DIR RESULTS_DIR
# GPU_CHECK_SCALE=small runs tiny sizes, to try the script on a machine without a GPU
# (Mesa's lavapipe).
set -uo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: scripts/gpu-check.sh BUNDLE_DIR RESULTS_DIR" >&2
    exit 2
fi
bundle=$(cd "$1" && pwd) || { echo "error: bundle folder $1 does not exist; build it with scripts/gpu-bundle.sh" >&2; exit 1; }
mkdir -p "$2" && results=$(cd "$2" && pwd) || { echo "error: cannot create results folder $2" >&2; exit 1; }
scale=${GPU_CHECK_SCALE:-gpu}
budget_s=470
started=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

summary=()
note() { summary+=("$1"); echo "== $1"; }
# Seconds left of the budget, at most $1.
left() {
    local remaining=$((budget_s - (SECONDS - started)))
    (( remaining < $1 )) && echo $((remaining > 0 ? remaining : 1)) || echo "$1"
}

# Unpack the binaries (xz, or Python's lzma where xz is missing).
for packed in "$bundle"/bin/*.xz; do
    name=$(basename "$packed" .xz)
    if command -v xz > /dev/null; then
        xz -dc "$packed" > "$work/$name"
    else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$packed" "$work/$name"
    fi || { echo "error: cannot unpack $packed (needs xz or python3)" >&2; exit 1; }
    chmod +x "$work/$name"
done
(cd "$work" && sha256sum --quiet -c "$bundle/SHA256SUMS") || { echo "error: unpacked binaries do not match SHA256SUMS; rebuild the bundle" >&2; exit 1; }

export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export XDG_RUNTIME_DIR="$work/xdg"
mkdir -m 700 "$XDG_RUNTIME_DIR"
export RUST_BACKTRACE=1

# The machine and its GPU.
{
    cat "$bundle/BUILD"
    echo "date $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) cores)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null | sed 's/^/gpu /'
} > "$results/machine.txt"
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2> /dev/null | head -n 1)

# NVIDIA's Vulkan driver lives in libGLX_nvidia.so.0. Containers often have that library but
# not the ICD file that tells the loader about it; write one then.
icd_found=no
for dir in /etc/vulkan/icd.d /usr/share/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
    ls "$dir"/nvidia*.json > /dev/null 2>&1 && icd_found=yes
done
if [[ $icd_found == no && -n $gpu_mib ]]; then
    if ldconfig -p 2> /dev/null | grep -q libGLX_nvidia.so.0; then
        cat > "$work/nvidia_icd.json" << 'JSON'
{"file_format_version": "1.0.0", "ICD": {"library_path": "libGLX_nvidia.so.0", "api_version": "1.3"}}
JSON
        export VK_DRIVER_FILES="$work/nvidia_icd.json" VK_ICD_FILENAMES="$work/nvidia_icd.json"
        note "vulkan: no NVIDIA ICD file; wrote one for libGLX_nvidia.so.0"
    else
        note "vulkan: no NVIDIA ICD file and no libGLX_nvidia.so.0 (the container lacks the graphics driver capability); wgpu will find no GPU"
    fi
fi

if [[ $scale == small ]]; then
    speed_args=(--config "$bundle/bench-speed.json" --lengths 256,1024 --tokens-per-step 1024)
    memory_args=(--depths 2,4 --seq-len 1024 --hidden-size 128 --heads 2 --d-ff 256 --chunk-len 64 --num-hashes 2)
else
    speed_args=(--config "$bundle/bench-enwik8.json" --lengths 1024,4096,16384,65536 --tokens-per-step 65536)
    memory_args=(--depths 2,6,12 --seq-len 65536 --hidden-size 1024 --heads 16 --d-ff 4096 --chunk-len 128 --num-hashes 4)
fi
if [[ -n $gpu_mib ]]; then
    # Full attention's estimate is checked against the GPU's memory, not the host's.
    speed_args+=(--max-memory-gib "$(awk -v m="$gpu_mib" 'BEGIN { printf "%.1f", 0.8 * m / 1024 }')")
fi

# Stage 1: the wgpu tests (forward and training against the CPU, reversible gradients,
# generation).
stage() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout --signal=KILL "$(left "$limit")" "$@" > "$results/$name.log" 2>&1
    local status=$?
    local verdict=passed
    ((status == 137)) && verdict="stopped at its time limit"
    ((status != 0 && status != 137)) && verdict="failed (exit $status)"
    note "$name: $verdict in $((SECONDS - t0)) s; log $results/$name.log"
}
stage model-tests 150 "$work/model-tests" --test-threads 1 wgpu reversible::
REFORMER_INFER_BIN="$work/reformer-infer" stage infer-tests 90 "$work/infer-wgpu-tests" --test-threads 1

# Stage 2: speed against length, LSH and full attention.
stage speed 200 "$work/reformer-bench" speed --device wgpu "${speed_args[@]}" \
    --repeats 2 --timeout-s 60 --out "$results/speed.jsonl"

# Stage 3: memory against depth at the longest length.
stage memory 120 "$work/reformer-bench" memory --device wgpu --reversible-only "${memory_args[@]}"

echo
echo "GPU check, $((SECONDS - started)) s ($(grep '^gpu' "$results/machine.txt" || echo 'no NVIDIA GPU found'))"
printf '  %s\n' "${summary[@]}"
echo
echo "speed (full results: $results/speed.jsonl):"
grep -E '^(attention|lsh|full) ' "$results/speed.log" || echo "  no speed results"
echo
echo "memory:"
grep '^|' "$results/memory.log" || echo "  no memory results"
