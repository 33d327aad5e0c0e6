#!/bin/bash
# The first call on a GPU after sessions without one (docs/verification.md): the unverified
# features' tests and NSA verification in bf16, then the A/B timings of what is opt-in.
#   DEADLINE=540 scripts/gpu_first.sh     (results under $OUT)
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/env.txt
python3 -c "import torch,triton,numpy;print(torch.__version__,triton.__version__,numpy.__version__)" | tee -a $OUT/env.txt
git log --oneline -1 | tee -a $OUT/env.txt
timeout 200 python3 -m pytest -q -x tests/test_head_dims.py tests/test_decode.py tests/test_nsa.py -k "chunked or segments or token_tiles or window_shorter or queries_document or visible_blocks or step_ahead or paged_cache or fused_decode or top_blocks or last_rows" 2>&1 | tail -15 | tee $OUT/pytest_first.txt
timeout 120 python3 -m cli.main verify specs/nsa.yaml specs/nsa_linear.yaml --backward --decode --dtype bf16 --markdown $OUT/verify_nsa_bf16.md 2>&1 | grep -v -i warn | tail -30 | tee $OUT/verify_nsa.txt
timeout 120 python3 experiments/nsa_decode_gpu.py --json $OUT/nsa_decode.json 2>&1 | grep -v -i warn | tail -8 | tee $OUT/nsa_decode.txt
timeout 90 python3 experiments/gated_decode_gpu.py --json $OUT/gated_decode.json 2>&1 | grep -v -i warn | tail -20 | tee $OUT/gated.txt
timeout $((${DEADLINE:-570} - SECONDS)) python3 experiments/nsa_selected_gpu.py --json $OUT/nsa_selected.json 2>&1 | grep -v -i warn | tail -40 | tee $OUT/nsa_selected.txt
echo "done ${SECONDS}s"
