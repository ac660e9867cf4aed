cd /work/bench && . .venv/bin/activate
PRUNETUNE_CACHE=/work/cache python benchmarks/quality.py --storage /work/quality --targets 0.5 --seeds 0,1,2 \
  --methods optuna-affine-bn-top6 --distill off --keep /tmp/qkeep-09
PRUNETUNE_CACHE=/work/cache timeout 1200 python benchmarks/quality.py --storage /work/quality --targets 0.5 --seeds 0,1,2 \
  --methods uniform,global,uniform-bn,global-bn,optuna-affine-bn,dcpa --distill on --keep /tmp/qkeep-10
