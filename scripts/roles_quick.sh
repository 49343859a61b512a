#!/usr/bin/env bash
# The semantic-role report (experiments.md A), quick version: SmolLM2-135M plus the trained role suite
# when it exists, 16 pairs per role per model. About 10 minutes on an idle 2-core CPU.
#
#   bash scripts/roles_quick.sh                      # writes runs/roles_quick/report.md
#   SUITE=/path/to/suite OUT=runs/x bash scripts/roles_quick.sh
#
# Without a suite the report covers SmolLM2 only and says how to train the suite
# (`jaxcirc train role_suite --out runs/role_suite`, about 15 minutes, once; scripts/roles_full.sh does it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup-env.sh"
export PATH="$root/.venv/bin:$PATH"
cd "$root"
suite="${SUITE:-runs/role_suite}"
out="${OUT:-runs/roles_quick}"
suite_args=()
[ -d "$suite" ] && suite_args=(--suite "$suite")
jaxcirc roles smollm2-135m --out "$out" ${suite_args[@]+"${suite_args[@]}"}
echo "report: $out/report.md"
