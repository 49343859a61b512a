#!/usr/bin/env bash
# The accelerator run, prepared to fit one device call (about 5 minutes on an H100):
#
#   bash benchmarks/gpu.sh                      # results in $OUT (the device tool's) or ./gpu_results
#
# Installs jaxcirc without dependencies (the GPU image already holds jax with CUDA, flax, optax,
# orbax, chex), then: AtP vs batch in float32 and bfloat16 with the roofline measured in the same
# dtype and MFU against the device's nominal peak (atp_scaling.py), and exact patching sweeps at
# two batch sizes in both dtypes (patching_throughput.py). TransformerLens is not in the image, so
# the side-by-side ratios stay CPU rows. Override the sizes with ATP_BATCHES / PATCH_BATCHES.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
python="${PYTHON:-python3}"
site="${JAXCIRC_SITE:-/tmp/jaxcirc-site}"
"$python" -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" . >/dev/null
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/gpu_log.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$python" -c "import jax; print('jax', jax.__version__, jax.devices())"; } | tee "$log"
# One step failing (out of memory, say) must not cost the device call the others' figures.
step() { "$@" 2>&1 | grep -v Warning | tee -a "$log" || echo "FAILED ($?): $*" | tee -a "$log"; }
for dtype in float32 bfloat16; do
  step "$python" benchmarks/atp_scaling.py --batches "${ATP_BATCHES:-8,32,128,512}" --dtype "$dtype" \
    --out "$out/atp_$dtype.json"
done
for dtype in float32 bfloat16; do
  for batch in ${PATCH_BATCHES:-8 64}; do
    step "$python" benchmarks/patching_throughput.py --batch "$batch" --dtype "$dtype"
  done
done
