#!/usr/bin/env bash
# README command 1: set up .venv (first run only) and run the main job on the embedded default
# model, SmolLM2-135M-Instruct.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
export PATH="$root/.venv/bin:$PATH"

# The main job. For now: the next-token top-5 for a prompt, then the model's hook points.
jaxcirc logits smollm2-135m --prompt "The capital of France is" --top-k 5 && jaxcirc hooks smollm2-135m --summary
