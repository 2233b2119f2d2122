#!/usr/bin/env bash
# The CPU-hours tables on one GPU machine with many cores, as one command with a time limit,
# run side by side as parallel processes of 1 thread each, all on the one GPU (the tiny preset
# uses little of it):
#   1. benchmarks/tail_gain.py from random init (3 seeds, ROWS, 300 pre-training iterations),
#      with the box-source rows (ground truth = full, selective search, detector, random boxes);
#   2. benchmarks/tail_gain.py --upstream, the paper's setting (UP_ROWS);
#   3. benchmarks/probe_length.py for recipe variants (VARIANTS below, none by default), 300 iterations.
# Rows run row-major in ROWS order, so a run cut off by BUDGET_S loses the last rows, not a seed.
#
#   benchmarks/gpu_tables.sh OUT [BUDGET_S]            # e.g. on an H200 with 16 cores
#   SMOKE=1 benchmarks/gpu_tables.sh OUT 600          # toy sizes on the CPU, to check the command
#
# Each script stops at BUDGET_S (default 480) seconds; what finished by then is tabulated into
# OUT/tail_gain.md + .json, OUT/upstream.md + .json and OUT/variants.md + .json (records of
# unfinished runs are lost).
# Runs from the source tree (PYTHONPATH=src); wheels carried in .whl/ (faster-coco-eval for AP)
# are installed into /tmp/site first.
set -u
OUT=${1:?usage: benchmarks/gpu_tables.sh OUT [BUDGET_S]}
BUDGET=${2:-480}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=$(command -v "${PYTHON:-python3}")
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import faster_coco_eval" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
WORK=${WORK:-/tmp/drcl-tables}
mkdir -p "$WORK"
TG_JOBS=${TG_JOBS:-9}
UP_JOBS=${UP_JOBS:-6}
VAR_JOBS=${VAR_JOBS:-1}
ROWS=${ROWS:-random full random_same_ft no_drb no_ar no_sr hcl boxes_ss boxes_random boxes_detector hcl_lcl supervised}
UP_ROWS=${UP_ROWS:-random random_same_ft full no_drb no_ar no_sr hcl}
SEEDS=${SEEDS:-0 1 2}
# recipe variants for the HCL gap: name and --set overrides
VARIANTS=${VARIANTS-}  # e.g. "base: tau0.1:model.temperature=0.1 queue256:model.hcl_queue=256"
if [ -n "${SMOKE:-}" ]; then
  SIZES="--train-images 40 --classes 8 --pretrain-iters 3 --finetune-iters 3"; LENGTH=3
  UP_SIZES="--upstream-classes 10 --upstream-images 40 --upstream-iters 3"
else
  SIZES="--pretrain-iters 300"; LENGTH=300; UP_SIZES=""
fi
start=$(date +%s)
"$PY" -c 'import os, torch; print("gpu_tables:", os.cpu_count(), "cores, torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' | tee "$OUT/machine.txt"

timeout "$BUDGET" "$PY" benchmarks/tail_gain.py --out "$WORK/tail_gain" --seeds $SEEDS --rows $ROWS $SIZES \
  --threads 1 --jobs "$TG_JOBS" > "$WORK/tail_gain.log" 2>&1 &
timeout "$BUDGET" "$PY" benchmarks/tail_gain.py --out "$WORK/upstream" --upstream --seeds $SEEDS --rows $UP_ROWS \
  $SIZES $UP_SIZES --threads 1 --jobs "$UP_JOBS" > "$WORK/upstream.log" 2>&1 &
for v in $VARIANTS; do
  name=${v%%:*}; sets=${v#*:}; args=()
  for kv in ${sets//,/ }; do args+=(--set "$kv"); done
  timeout "$BUDGET" "$PY" benchmarks/probe_length.py --out "$WORK/variant-$name" --data "$WORK/variant-data" \
    --lengths "$LENGTH" --seeds $SEEDS --threads 1 --jobs "$VAR_JOBS" "${args[@]}" > "$WORK/variant-$name.log" 2>&1 &
done
wait
echo "runs stopped after $(( $(date +%s) - start )) s"

"$PY" benchmarks/tail_gain.py --out "$WORK/tail_gain" --report-only > "$OUT/tail_gain.md" 2>&1
cp "$WORK/tail_gain/results.json" "$OUT/tail_gain.json" 2>/dev/null
"$PY" benchmarks/tail_gain.py --out "$WORK/upstream" --report-only > "$OUT/upstream.md" 2>&1
grep -h "upstream classifier" "$WORK/upstream.log" >> "$OUT/upstream.md"
cp "$WORK/upstream/results.json" "$OUT/upstream.json" 2>/dev/null
: > "$OUT/variants.md"
for v in $VARIANTS; do
  name=${v%%:*}
  { echo "## $name (${v#*:})"; "$PY" benchmarks/probe_length.py --out "$WORK/variant-$name" --report-only 2>&1 | grep -v '^wrote'; echo; } >> "$OUT/variants.md"
done
"$PY" - "$WORK" "$OUT/variants.json" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
records = {d.name: [json.loads(p.read_text()) for p in sorted(d.glob("L*-seed*/record.json"))]
           for d in sorted(work.glob("variant-*"))}
Path(sys.argv[2]).write_text(json.dumps(records, indent=1))
EOF
tail -n 30 "$WORK"/tail_gain.log "$WORK"/upstream.log > "$OUT/logs.txt"; for f in "$WORK"/variant-*.log; do [ -e "$f" ] && tail -n 5 "$f" >> "$OUT/logs.txt"; done
cat "$OUT/tail_gain.md" "$OUT/upstream.md" "$OUT/variants.md"
echo "total $(( $(date +%s) - start )) s"
