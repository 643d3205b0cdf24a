#!/usr/bin/env bash
# Issue 35's accuracy runs: OFA under the authors' exact objective (--sharpness-form paper) and under the
# default chosen by them (--sharpness-form gain --probe-rows last; since 2026-12-08 what --arm ofa runs), paper protocol, seeds 42-44, 300 test rows.
# Resumable (each cell is kept as it finishes; rerun the same line to continue), niced, one thread a job so
# the two jobs share the 2 cores:
#   bash benchmarks/s_forms_runs.sh gemma3     # Gemma 3 270M: SST-2, MR, TREC (CE, ICL, zero-shot: results/accuracy_gemma3)
#   bash benchmarks/s_forms_runs.sh smollm2    # SmolLM2: SST-2, MR, TREC, Subj, SST-5 (CE trained beside the gain form)
#   bash benchmarks/s_forms_runs.sh gain-strong  # both models: the gain form at lambda_S = 0.5, which gives S about
#                                                # the gradient share the trace form had on SmolLM2 (0.26x CE's there,
#                                                # ~0.14x on Gemma 3; RESULTS.md, "The scale of S"). Run on
#                                                # SmolLM2's SST-2 and MR only (2026-12-08), no Gemma 3 yet.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/accuracy_s_forms
run() { python benchmarks/accuracy.py --nice 19 --threads 1 "$@"; }
case "${1:?gemma3, smollm2 or gain-strong}" in
  gemma3)
    run --model gemma3-270m --tasks sst2,mr,trec --arms ofa --sharpness-form gain --probe-rows last --out "$OUT/gemma3-gain-last"
    run --model gemma3-270m --tasks sst2,mr,trec --arms ofa --sharpness-form paper --out "$OUT/gemma3-paper" ;;
  smollm2)
    run --model smollm2 --tasks sst2,mr,trec,subj,sst5 --arms ce,ofa --sharpness-form gain --probe-rows last --out "$OUT/smollm2-gain-last"
    run --model smollm2 --tasks sst2,mr,trec,subj,sst5 --arms ofa --sharpness-form paper --out "$OUT/smollm2-paper" ;;
  gain-strong)
    run --model gemma3-270m --tasks sst2,mr,trec --arms ofa --sharpness-form gain --probe-rows last --lambda-s 0.5 \
      --out "$OUT/gemma3-gain-last-s0.5"
    run --model smollm2 --tasks sst2,mr,trec,subj,sst5 --arms ofa --sharpness-form gain --probe-rows last \
      --lambda-s 0.5 --out "$OUT/smollm2-gain-last-s0.5" ;;
  *) echo "unknown job $1 (gemma3, smollm2 or gain-strong)" >&2; exit 2 ;;
esac
