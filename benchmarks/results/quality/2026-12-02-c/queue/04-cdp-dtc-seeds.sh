cd /work/bench && . .venv/bin/activate
PRUNETUNE_CACHE=/work/cache nice -n 5 python benchmarks/quality.py --storage /work/quality --targets 0.5 --seeds 1,2 \
  --methods cdp-dtc --distill off --keep /tmp/qkeep-04
