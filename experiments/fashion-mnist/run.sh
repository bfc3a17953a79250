#!/usr/bin/env bash
# BEiT's claim at small scale: MIM pre-training on unlabelled Fashion-MNIST, then fine-tuning on
# 1k / 60k labels, against the same model trained from scratch with the same fine-tuning budget,
# over 3 seeds. Outputs under $OUT (default runs/fashion-mnist); summarise with report.py.
#   apt-get install dataset-fashion-mnist && cargo build --release && experiments/fashion-mnist/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BEIT=${BEIT:-target/release/beit}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-runs/fashion-mnist}
CFG=experiments/fashion-mnist/config.json
SEEDS=${SEEDS:-"0 1 2"}
PT_EPOCHS=${PT_EPOCHS:-5}
# Fine-tuning budgets (same for pre-trained and scratch): epochs per label-set size.
EPOCHS_1K=${EPOCHS_1K:-30}
EPOCHS_60K=${EPOCHS_60K:-1}
# Warm-up of the 60k-label runs, in epochs (a fraction when EPOCHS_60K is small: warm-up takes
# the learning rate up to its peak; the cosine decay after it is what anneals the model).
WARMUP_60K=${WARMUP_60K:-0.1}
# Test-set evaluation every N epochs on the 1k runs (always after the last epoch).
EVAL_EVERY_1K=${EVAL_EVERY_1K:-10}
mkdir -p "$OUT"

# 1. Visual tokenizer: a discrete VAE on the training images (labels unused).
[ -f "$OUT/tokenizer/dvae_config.json" ] || \
  $BEIT tokenizer train --data "$DATA" --output "$OUT/tokenizer" --grid 7 --downsamples 2 \
    --vocab-size 512 --hidden 32 --steps ${TOK_STEPS:-2000} --batch-size 64 --seed 0

# 2. MIM pre-training on all 60k training images (labels unused).
[ -f "$OUT/pretrain/model.safetensors" ] || \
  $BEIT pretrain --config "$CFG" --data "$DATA" --tokenizer "$OUT/tokenizer" --output "$OUT/pretrain" \
    --epochs "$PT_EPOCHS" --batch-size 128 --lr 1.5e-3 --warmup-epochs 1 --mask-ratio 0.4 \
    --min-mask-patches 4 --rrc-min-scale 0.5 --eval-limit 2000 --resume

# 3. Fine-tuning from the pre-trained weights and from scratch, same recipe and budget.
common=(--data "$DATA" --batch-size 64 --lr 2e-3 --min-lr 1e-5 --weight-decay 0.05 --drop-path 0.1
        --label-smoothing 0.1 --rrc-min-scale 0.5 --rand-augment 2,9 --eval-limit 10000)
for n in 1000 60000; do
  if [ "$n" = 1000 ]; then epochs=$EPOCHS_1K; warm=5; every=$EVAL_EVERY_1K; else epochs=$EPOCHS_60K; warm=$WARMUP_60K; every=1; fi
  for seed in $SEEDS; do
    for init in pretrained scratch; do
      dir="$OUT/finetune-$n-$init-seed$seed"
      [ -f "$dir/model.safetensors" ] && continue
      if [ "$init" = pretrained ]; then src=(--model "$OUT/pretrain" --layer-decay 0.75); else src=(--config "$CFG" --layer-decay 1.0); fi
      $BEIT train classification "${src[@]}" "${common[@]}" --train-limit "$n" --epochs "$epochs" \
        --warmup-epochs "$warm" --eval-every "$every" --seed "$seed" --output "$dir" --resume
    done
  done
done
echo "done: python3 experiments/fashion-mnist/report.py $OUT"
