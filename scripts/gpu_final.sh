#!/bin/bash
# The final GPU run of a session, split over calls that fit the device's 10-minute limit:
#   scripts/gpu_final.sh verify fwd:128 fwd:64     # verification of every shipped spec (bf16, with
#                                                  # gradients) and the GPU test tier, then benchmarks
#   SPECS="softcap alibi" scripts/gpu_final.sh fwdbwd:128
#   DTYPES="bf16 fp16" scripts/gpu_final.sh verify   # verification in each dtype (default bf16)
#   DTYPES="bf16 fp16" scripts/gpu_final.sh verify-varlen   # attention_varlen's, every spec
#   DTYPES="bf16 fp16" scripts/gpu_final.sh verify-decode   # attention_with_kvcache's, every spec that decodes
#   VSPECS="specs/temperature.yaml" scripts/gpu_final.sh verify   # verify groups over these specs only
#   FLEX=128x2048 scripts/gpu_final.sh bench-decode   # decoding beside SDPA (and Flex at these cases)
#   CASES=32x8192,1x8192x512 scripts/gpu_final.sh bench-decode   # these cases only
#   BASELINE=DIR scripts/gpu_final.sh fwd:128          # with DIR's modules as the peer `before`
#   WARM=8 scripts/gpu_final.sh fwd:128 fwd:64        # first compile every benchmark 8 at a time
#                                                     # (timings discarded), then time them one by one
#   DEADLINE=500 scripts/gpu_final.sh small-groups   # NSA at G 1, 2, 4 and 16 (selection, loop orders, whole
#                                                    # forward and backward) and the G 1 and G 4 profiles
#   DEADLINE=500 scripts/gpu_final.sh gluon   # the Gluon dK/dV kernel (an option): GPU test, verify, A/B
#   DEADLINE=540 scripts/gpu_final.sh first   # a session's first call (docs/verification.md): the GPU
#                                             # test tier, NSA's verification (decode, gradients),
#                                             # its decode step's kernels, its forward end to end
# Each benchmark group is MODE:HEAD_DIM over $SPECS at 1k, 4k and 16k tokens (16 heads at d128,
# 32 at d64), one JSON per spec so that a run cut short keeps the rest; nothing new starts after
# $DEADLINE seconds. $OUT gets the verification tables and the merged benchmark tables.
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p /tmp/v /tmp/b
SPECS=${SPECS:-"dense causal sliding_window prefix_lm softcap alibi"}
DEADLINE=${DEADLINE:-540}
bench() {  # MODE HEAD_DIM SPEC JSON
  local h=$(( $2 == 128 ? 16 : 32 )) flag=""
  [ "$1" = fwdbwd ] && flag="--backward"
  timeout 150 python3 -m cli.main bench specs/$3.yaml --head-dim $2 $flag ${BASELINE:+--baseline $BASELINE} \
    --shapes 16x${h}x1024,4x${h}x4096,1x${h}x16384 --json $4 2>&1 | grep -v -i warn | tail -3
}
export -f bench
if [ -n "$WARM" ]; then  # the compile caches (Triton's, Inductor's) are shared between processes
  for group in "$@"; do [ "$group" = verify ] || for s in $SPECS; do echo "${group%%:*} ${group##*:} $s"; done; done |
    timeout 300 xargs -P "$WARM" -L 1 bash -c 'bench $0 $1 $2 /tmp/warm_$0_$2_$1.json > /dev/null'
  echo "warm ${SECONDS}s"
fi
VSPECS=${VSPECS:-specs/*.yaml}
for group in "$@"; do
  if [ "$group" = first ]; then  # at most 6 files under $OUT (the device returns only a few)
    log=$OUT/first.log
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $log
    python3 -c "import torch,triton,numpy;print(torch.__version__,triton.__version__,numpy.__version__)" | tee -a $log
    # the GPU tier of NSA's and decoding's tests (the interp tier runs on CPU tensors: CI's, not
    # here; the newest kernels are exercised on the GPU by verify's rows below)
    timeout 100 python3 -m pytest -q -m gpu tests/test_nsa.py tests/test_decode.py 2>&1 | tail -15 | tee -a $log
    # NSA's verification, each spec and mode its own process (all four at once), the tables into the log
    for s in nsa nsa_linear; do for m in decode backward; do
      timeout 240 python3 -m cli.main verify specs/$s.yaml --$m --dtype bf16 --markdown /tmp/v/first_${s}_$m.md \
        > /tmp/v/first_${s}_$m.log 2>&1 &
    done; done; wait
    for f in /tmp/v/first_nsa*.log; do echo "== $f"; grep -v -i warn $f | tail -2; cat ${f%.log}.md 2>/dev/null; done | tee -a $log
    timeout 120 python3 experiments/nsa_decode_gpu.py --kernels --cases nsa_linear:1x65536,nsa:1x65536,nsa:8x65536x4 --json $OUT/nsa_decode.json 2>&1 | grep -v -i warn | tail -4 | tee -a $log
    # the NSA forward end to end at the defaults (the selection, the selected branch's tokens)
    [ $SECONDS -lt $DEADLINE ] && timeout $(( DEADLINE + 40 - SECONDS )) python3 experiments/nsa_gpu.py --seqs 32768,65536 --specs nsa,nsa_linear --no-stages --json $OUT/nsa_fwd.json 2>&1 | grep -v -i warn | tail -4 | tee -a $log
    continue
  fi
  if [ "$group" = small-groups ]; then  # NSA's selection and loop orders at small groups (issue 17), the G 1 and G 4 profiles
    timeout 330 python3 experiments/nsa_selected_gpu.py --cases ${CASES:-nsa:16/16:65536,nsa:16/8:65536,nsa:16/4:65536,nsa:64/4:65536,nsa_linear:16/16:32768,nsa_linear:64/4:65536} \
      --json $OUT/nsa_small_groups.json 2>&1 | grep -v -i warn | tee -a $OUT/small_groups.log
    [ $SECONDS -lt $DEADLINE ] && timeout $(( DEADLINE + 40 - SECONDS )) python3 experiments/nsa_gpu.py --seqs 65536 --specs nsa \
      --heads 16/16 --no-stages --profile $OUT/g1.txt --json $OUT/g1.json 2>&1 | grep -v -i warn | tail -2 | tee -a $OUT/small_groups.log
    [ $SECONDS -lt $DEADLINE ] && timeout $(( DEADLINE + 40 - SECONDS )) python3 experiments/nsa_gpu.py --seqs 65536 --specs nsa \
      --heads 16/4 --no-stages --profile $OUT/g4.txt 2>&1 | grep -v -i warn | tail -1 | tee -a $OUT/small_groups.log
    continue
  fi
  if [ "$group" = gluon ]; then  # the Gluon dK/dV kernel in the runtime (docs/decisions/gluon-dkdv.md): checked, then A/B
    log=$OUT/gluon.log
    timeout 150 python3 -m pytest -q tests/test_gpu.py -k gluon 2>&1 | tail -4 | tee -a $log
    timeout 200 python3 -m cli.main verify specs/head_dim_256.yaml --backward --dtype bf16 --dtype fp16 \
      --option gluon_dkdv --markdown $OUT/verify_gluon_dkdv.md 2>&1 | grep -v -i warn | tail -3 | tee -a $log
    [ $SECONDS -lt $DEADLINE ] && timeout $(( DEADLINE + 40 - SECONDS )) python3 -m cli.main bench specs/head_dim_256.yaml \
      --ab gluon_dkdv --shapes 4x16x4096,1x16x16384 --json $OUT/gluon_ab.json 2>&1 | grep -v -i warn | tail -4 | tee -a $log
    # the probe's kernels, now unserialized, beside attngen's at d256, d192 and d128 (FA3's d128 layout)
    [ $SECONDS -lt $DEADLINE ] && timeout $(( DEADLINE + 40 - SECONDS )) python3 experiments/gluon_bwd_probe.py \
      2>&1 | grep -v -i warn > $OUT/gluon_bwd_probe.txt; grep -E "correct|FAILED|B4|B1" $OUT/gluon_bwd_probe.txt | cut -c1-400 | tee -a $log
    continue
  fi
  if [ "$group" = bench-decode ]; then  # causal, the cases (attngen/bench_decode.py), CUDA-graph replays
    timeout 500 python3 -m cli.main bench-decode specs/causal.yaml --variants "${VARIANTS:-}" --cases "${CASES:-}" \
      --flex "${FLEX:-}" --json $OUT/bench_decode${FLEX:+_flex}.json 2>&1 | grep -v -i warn | tee -a $OUT/bench_decode.log
    continue
  fi
  if [ "$group" = verify-decode ]; then  # attention_with_kvcache, contiguous and paged caches
    for dt in ${DTYPES:-bf16}; do
      ls $VSPECS | DT=$dt timeout 300 xargs -P 6 -I{} sh -c 'n=$(basename {} .yaml); timeout 250 python3 -m cli.main verify {} --decode --dtype $DT --markdown /tmp/v/${n}_decode_$DT.md > /tmp/v/${n}_decode_$DT.log 2>&1; echo "verify --decode $n $DT rc=$?"'
      cat /tmp/v/*_decode_$dt.md > $OUT/verify_decode_$dt.md 2>/dev/null
    done
    continue
  fi
  if [ "$group" = verify-varlen ]; then  # attention_varlen on packed sequences, every spec, with gradients
    for dt in ${DTYPES:-bf16}; do
      ls $VSPECS | DT=$dt timeout 300 xargs -P 4 -I{} sh -c 'n=$(basename {} .yaml); timeout 200 python3 -m cli.main verify {} --varlen --backward --dtype $DT --markdown /tmp/v/${n}_varlen_$DT.md > /tmp/v/${n}_varlen_$DT.log 2>&1; echo "verify --varlen $n $DT rc=$?"'
      cat /tmp/v/*_varlen_$dt.md > $OUT/verify_varlen_$dt.md
    done
    continue
  fi
  if [ "$group" = verify ]; then
    for dt in ${DTYPES:-bf16}; do
      ls $VSPECS | DT=$dt timeout 300 xargs -P 4 -I{} sh -c 'n=$(basename {} .yaml); timeout 200 python3 -m cli.main verify {} --backward --dtype $DT --markdown /tmp/v/${n}_$DT.md > /tmp/v/${n}_$DT.log 2>&1; echo "verify $n $DT rc=$?"'
      cat /tmp/v/*_$dt.md > $OUT/verify_$dt.md
    done
    tail -n 3 /tmp/v/*.log > $OUT/verify_log.txt
    timeout 100 python3 -m pytest -q tests/test_gpu.py 2>&1 | tail -2
    continue
  fi
  mode=${group%%:*}; d=${group##*:}
  for s in $SPECS; do
    [ $SECONDS -lt $DEADLINE ] || { echo "deadline: skipped $mode $s d$d"; continue; }
    bench $mode $d $s /tmp/b/${mode}_${s}_$d.json
  done
done
for mode in fwd fwdbwd; do
  ls /tmp/b/${mode}_*.json >/dev/null 2>&1 && python3 -m cli.main bench-merge /tmp/b/${mode}_*.json \
    --json $OUT/bench_$mode.json --markdown $OUT/bench_$mode.md > /dev/null
done
echo "elapsed ${SECONDS}s"
