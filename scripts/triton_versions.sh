#!/usr/bin/env bash
# The kernels against every supported triton release, on any machine (no GPU needed):
#   bash scripts/triton_versions.sh [VERSION ...]     (default: 3.6.0 3.7.0 3.8.0 3.9.0)
# For each release, installed beside the current environment (pip --target, nothing replaced), it runs the
# kernel, solver and graph tests in triton's CPU interpreter and benchmarks/codegen_audit.py, which
# compiles every kernel for sm_90 with that release's own compiler and ptxas. Prints one line per release.
# Needs the project installed (pip install -e ".[dev,triton]"); downloads ~200-300 MB per release once,
# into ${TRITON_VERSIONS_CACHE:-~/.cache/fixedpoint-triton}.
set -uo pipefail
cd "$(dirname "$0")/.."
cache="${TRITON_VERSIONS_CACHE:-$HOME/.cache/fixedpoint-triton}"
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(3.6.0 3.7.0 3.8.0 3.9.0)
tests=(tests/test_kernels.py tests/test_solvers.py tests/test_graph.py tests/test_gpu_scripts.py tests/test_robustness.py)
summary=()
for version in "${versions[@]}"; do
    target="$cache/triton-$version"
    if [ ! -d "$target/triton" ]; then
        pip install -q --no-deps --target "$target" "triton==$version" || { summary+=("$version: install failed"); continue; }
    fi
    path="$target"
    case "$version" in  # triton 3.6's interpreter turns 1-element arrays into ints, which numpy 2.4 refuses
        3.6.*)
            [ -d "$cache/numpy-2.3/numpy" ] || pip install -q --no-deps --target "$cache/numpy-2.3" "numpy<2.4"
            path="$target:$cache/numpy-2.3" ;;
    esac
    found=$(PYTHONPATH="$path" python -c "import triton; print(triton.__version__)")
    log="$cache/triton-$version.log"
    PYTHONPATH="$path" TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider "${tests[@]}" >"$log" 2>&1
    result=$(tail -n 1 "$log")
    if PYTHONPATH="$path" python benchmarks/codegen_audit.py >"$log.audit" 2>&1; then
        audit="every kernel compiles for sm_90"
        grep -qi "warn" "$log.audit" && audit="$audit (with warnings: $log.audit)"
    else
        audit="codegen audit FAILED: $log.audit"
    fi
    summary+=("triton $found: $result; $audit")
done
printf '%s\n' "${summary[@]}"
