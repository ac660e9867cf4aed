#!/bin/bash
# usage: ab.sh LABEL STORAGE_MODE(same|fresh) N
cd /work/main && . .venv/bin/activate
export PRUNETUNE_CACHE=/work/cache
out=/tmp/t15c/ab-$1.txt; : > $out
for i in $(seq 1 $3); do
  for variant in before after; do
    if [ $2 = fresh ]; then st=/tmp/t15c-runs/fresh-$variant-$i; else st=/tmp/t15c-runs; fi
    if [ $variant = before ]; then export T15C_SERIAL=1; else unset T15C_SERIAL; fi
    load=$(cut -d' ' -f1 /proc/loadavg)
    s=$(date +%s.%N)
    python -m prunetune.search.cli run --model small_cnn --dataset digits --trials 1 --finetune-epochs 1 --set final.epochs=0 --set warm_start=false --storage $st > /tmp/t15c/last.log 2>&1
    rc=$?
    e=$(date +%s.%N)
    echo "$i $variant rc=$rc wall=$(python -c "print(round($e-$s,2))") load1=$load" | tee -a $out
  done
done
