cd /work/bench && . .venv/bin/activate
PRUNETUNE_CACHE=/work/cache nice -n 5 python benchmarks/quality.py --storage /work/quality --targets 0.25 --seeds 0,1,2 \
  --methods uniform,global,uniform-bn,global-bn,optuna-affine-bn,dcpa --distill on --keep /tmp/qkeep-07
