#!/usr/bin/env bash
# Issue 10's GPU table in one command: customdiff train on random-weight SD 1.5 / SD 2.1 / SDXL architectures,
# each lever on and off, and (with DIFFUSERS_EXAMPLE=path/to/train_custom_diffusion.py) diffusers' example on
# the same data and settings. Every run appends one JSON line to $OUT; see docs/performance.md.
#
#   bash benchmarks/gpu_table.sh            # everything (about 25 minutes on an H100)
#   bash benchmarks/gpu_table.sh sd15       # one group: sd15 | levers | example | sd21 | sdxl | core | profile | graphs | next | suite
#   STEPS=150 DIFFUSERS_EXAMPLE=... bash benchmarks/gpu_table.sh core   # one 10-minute device call: the
#                                           # example, the defaults, lean activations off, checkpointing
#   STEPS=150 DEADLINE=480 DIFFUSERS_EXAMPLE=... bash benchmarks/gpu_table.sh next   # what is still
#                                           # unmeasured, most needed first (docs/performance.md)
# DEADLINE=S: start no run after S seconds of this script, so a call's time limit cuts between runs, not in one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/realscale}
OUT=${OUT:-benchmarks/results-gpu.jsonl}
STEPS=${STEPS:-250}
groups=${*:-sd15 levers example sd21 sdxl}
DEADLINE=${DEADLINE:-0}
late() { [ "$DEADLINE" -gt 0 ] && [ "$SECONDS" -ge "$DEADLINE" ] && echo "skipped after ${SECONDS}s (DEADLINE=$DEADLINE): $*" >&2; }
# a run that fails is reported and the next one starts: one crash must not cost the rest of a device call; the
# script's exit status still says that something failed
failed=0
run() {
  late "$@" || "$PY" benchmarks/realscale.py --work "$WORK" --json "$OUT" "$@" || { echo "run FAILED: $*" >&2; failed=1; }
}
# the tiny pipeline's delta with graphs against the eager one, on the GPU
graphs_test() {
  late graphs test || "$PY" -m pytest -q -rP -p no:cacheprovider tests/test_graphs.py \
    -k "real_cuda_graphs or failed_real_capture or real_capture_whole" || { echo "graphs: test FAILED" >&2; failed=1; }
}
sd15=(--arch sd15 --resolution 512 --batch-size 8 --train-steps "$STEPS")
for g in $groups; do
  case $g in
    sd15)
      run "${sd15[@]}" --mixed-precision fp16
      run "${sd15[@]}" --mixed-precision bf16
      run "${sd15[@]}" --mixed-precision fp16 --gradient-checkpointing ;;
    levers)  # each lever off alone (fp16), then the three that are off by default on
      run "${sd15[@]}" --mixed-precision fp16 --frozen-weights float32
      run "${sd15[@]}" --mixed-precision fp16 --no-cache
      run "${sd15[@]}" --mixed-precision fp16 --lean-activations off
      run "${sd15[@]}" --mixed-precision fp16 --prefetch 0
      run "${sd15[@]}" --mixed-precision fp16 --log-every 1
      run "${sd15[@]}" --mixed-precision fp16 --channels-last
      run "${sd15[@]}" --mixed-precision fp16 --cudnn-benchmark
      run "${sd15[@]}" --mixed-precision fp16 --compile ;;
    example)
      if [ -z "${DIFFUSERS_EXAMPLE:-}" ]; then
        echo "example: set DIFFUSERS_EXAMPLE=path/to/examples/custom_diffusion/train_custom_diffusion.py" >&2
      else
        run "${sd15[@]}" --mixed-precision fp16 --example "$DIFFUSERS_EXAMPLE"
        run "${sd15[@]}" --mixed-precision fp16 --gradient-checkpointing --example "$DIFFUSERS_EXAMPLE"
      fi ;;
    core)  # what issue 10's goals need, alternating ours with the lever off
      if [ -n "${DIFFUSERS_EXAMPLE:-}" ]; then run "${sd15[@]}" --mixed-precision fp16 --example "$DIFFUSERS_EXAMPLE"; fi
      run "${sd15[@]}" --mixed-precision fp16
      run "${sd15[@]}" --mixed-precision fp16 --lean-activations off
      run "${sd15[@]}" --mixed-precision fp16
      run "${sd15[@]}" --mixed-precision fp16 --lean-activations off
      run "${sd15[@]}" --mixed-precision fp16 --gradient-checkpointing ;;
    profile)  # where a step's time goes: host-side floor, then torch.profiler tables next to $OUT
      "$PY" benchmarks/step_overhead.py --device cuda
      dir=$(dirname "$OUT")
      run "${sd15[@]}" --mixed-precision fp16 --profile "$dir/profile-customdiff.txt" --label profile
      if [ -n "${DIFFUSERS_EXAMPLE:-}" ]; then
        run "${sd15[@]}" --mixed-precision fp16 --example "$DIFFUSERS_EXAMPLE" --profile "$dir/profile-example.txt" \
          --label profile
      fi ;;
    graphs)  # --cuda-graphs: the tiny pipeline's delta against the eager one, then the table's runs alternating
      graphs_test
      run "${sd15[@]}" --mixed-precision fp16 --cuda-graphs on --label graphs
      run "${sd15[@]}" --mixed-precision fp16 --cuda-graphs off --label eager
      if [ -n "${DIFFUSERS_EXAMPLE:-}" ]; then run "${sd15[@]}" --mixed-precision fp16 --example "$DIFFUSERS_EXAMPLE"; fi
      run "${sd15[@]}" --mixed-precision bf16 --cuda-graphs on --label graphs-bf16
      run "${sd15[@]}" --mixed-precision fp16 --cuda-graphs on --lean-activations off --label graphs-lean-off
      run "${sd15[@]}" --mixed-precision fp16 --cuda-graphs on --label graphs
      "$PY" benchmarks/compare_deltas.py "$OUT" graphs eager ;;
    next)  # the still unmeasured items, most needed first (docs/performance.md): the GPU tests, checkpointing's
           # delta with and without graphs, bf16 with graphs, what the GPU holds with graphs off, then the example
      graphs_test
      run "${sd15[@]}" --mixed-precision fp16 --gradient-checkpointing --label ckpt-graphs
      run "${sd15[@]}" --mixed-precision fp16 --gradient-checkpointing --cuda-graphs off --label ckpt-eager
      late compare || "$PY" benchmarks/compare_deltas.py "$OUT" ckpt-graphs ckpt-eager || true
      run "${sd15[@]}" --mixed-precision bf16 --label graphs-bf16
      run "${sd15[@]}" --mixed-precision fp16 --cuda-graphs off --label eager
      if [ -n "${DIFFUSERS_EXAMPLE:-}" ]; then run "${sd15[@]}" --mixed-precision fp16 --example "$DIFFUSERS_EXAMPLE"; fi
      run "${sd15[@]}" --mixed-precision fp16 --label graphs ;;
    suite)  # the test suite on the GPU machine. train() takes the GPU path there (CUDA graphs, fused AdamW, pinned
            # batches, leaner activations), so every training test runs it, the web app's too; a test that fails
            # only here is a GPU-only bug or a tolerance the GPU's summation order breaks. Needs the web app's
            # wheels in .whl (fastapi, starlette, pydantic, pydantic_core, annotated-types, typing-inspection,
            # uvicorn, python-multipart); Chromium is absent there, so the browser tests skip
      late suite || "$PY" -m pytest -q -p no:cacheprovider --tb=line -rfE tests || { echo "suite: FAILED" >&2; failed=1; } ;;
    sd21)
      run --arch sd21 --resolution 768 --batch-size 8 --train-steps "$STEPS" --mixed-precision fp16 ;;
    sdxl)
      run --arch sdxl --resolution 1024 --batch-size 2 --train-steps "$STEPS" --mixed-precision fp16
      run --arch sdxl --resolution 1024 --batch-size 2 --train-steps "$STEPS" --mixed-precision bf16 ;;
    *) echo "unknown group $g (sd15 | levers | example | sd21 | sdxl | core | profile | graphs | next | suite)" >&2; exit 2 ;;
  esac
done
echo "results in $OUT"
exit $failed
