cd /work/bench && . .venv/bin/activate
PRUNETUNE_CACHE=/work/cache nice -n 5 python benchmarks/quality.py --storage /work/quality --targets 0.5 --seeds 0,1,2 \
  --methods global-lamp,optuna-affine,optuna-affine-bn --distill off --keep /tmp/qkeep-02
