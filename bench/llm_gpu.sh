#!/usr/bin/env bash
# The GPU table for docs/LLM.md: Llama-3.2-1B and Llama-3.1-8B shapes with random weights,
# sequence 512, batch 8, ffa with LoRA r 16 on q_proj/v_proj; a bf16 base (bare PEFT,
# plain, DP with per-sample hooks and with ghost clipping) and a 4-bit NF4 base (plain,
# DP with ghost clipping). Needs one CUDA GPU and bitsandbytes; each row is a fresh
# process, its peak torch.cuda.max_memory_allocated. Budget: under 8 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
run() { "$PY" bench/llm.py --device cuda --batch 8 --seq 512 --steps 3 --methods ffa "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run --shapes llama-3.2-1b --modes peft,plain,hooks,ghost --dtype bfloat16
run --shapes llama-3.2-1b,llama-3.1-8b --modes plain,ghost --dtype bfloat16 --quantization nf4
