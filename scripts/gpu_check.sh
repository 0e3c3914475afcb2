#!/usr/bin/env bash
# The GPU checks of the fused engine as one prepared run for the lent GPU machine (see
# ../shared/gpu/README.md): the cuda-marked tests, then scripts/bench_gpu.py on a random
# Llama-2-7B-shaped model in /dev/shm. Everything it reports lands in $OUT (at most 8 files).
#
# Here, once:   ../shared/gpu/fetch_wheels.sh && scripts/gpu_check.sh --prepare
# There:        run with carry [".whl", ".gpu_carry"] and command "bash scripts/gpu_check.sh"
#               (about 8 minutes: give it timeout_s 570).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  # The default model's tokenizer files: the GPU machine lacks the GGUF package they come from.
  grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
  src=$(python3 -c "from engines.hf.default_model import ensure_default_model as e; print(e())" | tail -1)
  mkdir -p .gpu_carry/tokenizer
  for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja config.json \
           generation_config.json; do
    [ -f "$src/$f" ] && cp "$src/$f" .gpu_carry/tokenizer/
  done
  ls -la .gpu_carry/tokenizer
  exit 0
fi
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
timeout 180 python3 -m pytest -q -m cuda tests/unit -p no:cacheprovider > "$OUT/pytest_cuda.txt" 2>&1
echo "pytest -m cuda exit $?" >> "$OUT/pytest_cuda.txt"
timeout 360 python3 scripts/bench_gpu.py --build-7b /dev/shm/llama7b --tokenizer-dir .gpu_carry/tokenizer \
  --device cuda --level-duration 40 --json "$OUT/bench_gpu.json" --server-log "$OUT/server.log" \
  > "$OUT/bench_gpu.txt" 2>&1
echo "bench_gpu exit $?" >> "$OUT/bench_gpu.txt"
tail -c 200000 "$OUT/server.log" > "$OUT/server_tail.log" 2>/dev/null && rm -f "$OUT/server.log"
