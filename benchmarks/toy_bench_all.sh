#!/usr/bin/env bash
# docs/benchmarks.md's two main tables on the toy world, in two 1-thread processes per table (2 cores):
#   the five single-concept methods on 6 concepts x seeds 0 1 2 (90 runs), then the four pair methods on the
#   3 pairs x seeds 0 1 2; then benchmarks/bench_tables.py prints both tables and keeps every row as JSON.
#
#   bash benchmarks/toy_bench_all.sh OUT [DATE]     # about an hour on 2 idle cores
#
# OUT gets singles_a/, singles_b/, pairs_a/, pairs_b/ (each a `customdiff bench` folder with its report.html),
# their logs, and tables.md. A folder whose results.json exists is kept, so a rerun resumes at the next table
# half. CUSTOMDIFF_TOY_ASSETS picks a rebuilt assets folder instead of the shipped one.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/toy_bench_all.sh OUT [DATE]}
date_tag=${2:-$(date +%F)}
py=${PY:-.venv/bin/python}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1

bench() {  # name, then bench arguments; skipped when that folder holds a finished bench
    local name=$1
    shift
    if [ -f "$out/$name/results.json" ]; then
        echo "$name: done before, kept"
        return
    fi
    "$py" -m customdiff bench "$@" --out "$out/$name" > "$out/$name.log" 2>&1
}

echo "singles: $(date)"
bench singles_a --concepts striped_circle banded_triangle dotted_heart --pairs 0 &
bench singles_b --concepts twotone_cross checker_square ringed_star --pairs 0 &
wait
echo "pairs: $(date)"
bench pairs_a --concepts striped_circle --methods cd_no_aug --pairs 3 --seeds 0 1 &
bench pairs_b --concepts striped_circle --methods cd_no_aug --pairs 3 --seeds 2 &
wait
echo "done: $(date)"
{
    echo "## Single concepts"
    echo
    "$py" benchmarks/bench_tables.py "$out/singles_a" "$out/singles_b" \
        --json "benchmarks/results/toy-bench-$date_tag-singles.json"
    echo
    echo "## Pairs (the cd_no_aug rows are the single deltas the pairs start from)"
    echo
    "$py" benchmarks/bench_tables.py "$out/pairs_a" "$out/pairs_b" \
        --json "benchmarks/results/toy-bench-$date_tag-pairs.json"
} | tee "$out/tables.md"
