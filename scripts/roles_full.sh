#!/usr/bin/env bash
# The semantic-role report (experiments.md A), full version: trains the role suite first if it is
# missing (jaxcirc/suites/role_suite.toml, about 15 minutes on 2 CPU cores), then runs the whole
# pipeline with 256 pairs per role for SmolLM2-135M and 128 per role for each suite model.
# About 1.5-2 hours of CPU time on 2 cores (EAP-IG and exact edge patching on SmolLM2 dominate).
#
#   bash scripts/roles_full.sh                       # writes runs/roles_full/report.md
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
export PATH="$root/.venv/bin:$PATH"
cd "$root"
suite="${SUITE:-runs/role_suite}"
out="${OUT:-runs/roles_full}"
[ -d "$suite" ] || jaxcirc train role_suite --out "$suite"
jaxcirc roles smollm2-135m --suite "$suite" --out "$out" --full
echo "report: $out/report.md"
