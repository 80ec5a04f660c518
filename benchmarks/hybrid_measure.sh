#!/usr/bin/env bash
# Hybrid answering measurements (docs/hybrid.md): Star, full and hybrid rows of `starqa eval` with one model.
# Usage: benchmarks/hybrid_measure.sh MODEL OUTDIR [SAMPLES_8K] [SAMPLES_16K]
# Every run appends to OUTDIR/*.jsonl (--resume): rerunning continues where a run stopped.
# tune-4k: the data the escalation signal was chosen on (seed 101); the others are held out (seed 0, the sample
# contract's own questions).
set -u
model=$1; out=$2; s8=${3:-2}; s16=${4:-1}
py=${PYTHON:-python}
mkdir -p "$out"
run() {  # name, then eval arguments
    local name=$1; shift
    local started=$SECONDS
    nice -n 10 $py -m starqa eval --model "$model" --resume "$out/$name.jsonl" --json "$@" > "$out/$name.json" 2> "$out/$name.err"
    echo "$name: exit $? in $((SECONDS - started)) s" >> "$out/times.txt"
}
run tune-4k --suite ruler --lengths 4096 --samples 1 --seed 101
run contract --doc samples/contract.pdf --qa samples/contract-qa.jsonl
run ruler-8k --suite ruler --lengths 8192 --samples "$s8"
run ruler-16k --suite ruler --lengths 16384 --samples "$s16"
