#!/bin/bash
# The final GPU run of a session, split over calls that fit the device's 10-minute limit:
#   scripts/gpu_final.sh verify fwd:128 fwd:64     # verification of every shipped spec (bf16, with
#                                                  # gradients) and the GPU test tier, then benchmarks
#   SPECS="softcap alibi" scripts/gpu_final.sh fwdbwd:128
#   DTYPES="bf16 fp16" scripts/gpu_final.sh verify   # verification in each dtype (default bf16)
# Each benchmark group is MODE:HEAD_DIM over $SPECS at 1k, 4k and 16k tokens (16 heads at d128,
# 32 at d64), one JSON per spec so that a run cut short keeps the rest; nothing new starts after
# $DEADLINE seconds. $OUT gets the verification tables and the merged benchmark tables.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p /tmp/v /tmp/b
SPECS=${SPECS:-"dense causal sliding_window prefix_lm softcap alibi"}
DEADLINE=${DEADLINE:-540}
for group in "$@"; do
  if [ "$group" = verify ]; then
    for dt in ${DTYPES:-bf16}; do
      ls specs/*.yaml | DT=$dt timeout 300 xargs -P 4 -I{} sh -c 'n=$(basename {} .yaml); timeout 200 python3 -m cli.main verify {} --backward --dtype $DT --markdown /tmp/v/${n}_$DT.md > /tmp/v/${n}_$DT.log 2>&1; echo "verify $n $DT rc=$?"'
      cat /tmp/v/*_$dt.md > $OUT/verify_$dt.md
    done
    tail -n 3 /tmp/v/*.log > $OUT/verify_log.txt
    timeout 100 python3 -m pytest -q tests/test_gpu.py 2>&1 | tail -2
    continue
  fi
  mode=${group%%:*}; d=${group##*:}; h=$(( d == 128 ? 16 : 32 )); flag=""
  [ "$mode" = fwdbwd ] && flag="--backward"
  for s in $SPECS; do
    [ $SECONDS -lt $DEADLINE ] || { echo "deadline: skipped $mode $s d$d"; continue; }
    timeout 120 python3 -m cli.main bench specs/$s.yaml --head-dim $d $flag \
      --shapes 16x${h}x1024,4x${h}x4096,1x${h}x16384 --json /tmp/b/${mode}_${s}_$d.json 2>&1 | grep -v -i warn | tail -3
  done
done
for mode in fwd fwdbwd; do
  ls /tmp/b/${mode}_*.json >/dev/null 2>&1 && python3 -m cli.main bench-merge /tmp/b/${mode}_*.json \
    --json $OUT/bench_$mode.json --markdown $OUT/bench_$mode.md > /dev/null
done
echo "elapsed ${SECONDS}s"
