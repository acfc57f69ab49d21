#!/usr/bin/env bash
# Issue 6's GPU check in one call (under 10 minutes: the timeouts below add up to 9.5; with graph=True's rows,
# since removed, it took 4 on an H100, 5 on an H200): the environment, the GPU tests (kernels at real sizes,
# the graph="solver" loop, solvers), benchmarks/bench_gpu.py in two runs (its rows on the eager f, then the
# "f compiled" rows, torch.compile(f, mode="reduce-overhead") with the solvers: graph=True's replacement, whose
# compile time is not known yet, so a timeout there loses only those rows), the profiles (the compiled f last)
# and the bf16 and fp32 launch-parameter sweep (benchmarks/gpu_tune.py).
# Logs and the benchmark tables as JSON go to $OUT (default ./gpu-check): 10 files.
# Needs torch with CUDA, triton and pytest; uses the checkout itself (no install).
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, '|', torch.cuda.get_device_name())" 2>&1 | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit --format=csv 2>&1 | tee -a "$OUT/env.txt"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_graph.py tests/test_solvers.py 2>&1 | tee "$OUT/tests.log"
BENCH_JSON="$OUT/bench.json" timeout 180 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_gpu.py -k "not compiled" 2>&1 | tee "$OUT/bench.log"
BENCH_JSON="$OUT/bench-compiled.json" timeout 120 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_gpu.py -k compiled 2>&1 | tee "$OUT/bench-compiled.log"
timeout 75 python3 benchmarks/gpu_profile.py "$OUT" > "$OUT/profile.log" 2>&1; grep "^## " "$OUT/profile.log"
timeout 105 python3 benchmarks/gpu_tune.py "$OUT" bfloat16 float32 2>&1 | tee "$OUT/tune.log"
