#!/usr/bin/env bash
# README command 1: set up .venv (first run only) and run the main job on the embedded default
# model, SmolLM2-135M-Instruct: the semantic-role circuit analysis (quick version), into a new
# run directory runs/roles-<time> (earlier runs are never overwritten). The trained role suite
# is included when runs/role_suite exists (`jaxcirc train role_suite --out runs/role_suite`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
export PATH="$root/.venv/bin:$PATH"
cd "$root"

out="runs/roles-$(date +%Y%m%d-%H%M%S)"
jaxcirc logits smollm2-135m --prompt "The capital of France is" --top-k 5
jaxcirc roles smollm2-135m --out "$out"
echo "report: $out/report.md"
