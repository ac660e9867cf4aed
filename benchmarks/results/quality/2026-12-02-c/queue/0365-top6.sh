cd /work/bench && { git pull -q /work/main main || echo PULL FAILED; }; . .venv/bin/activate
git log --oneline -1
PRUNETUNE_CACHE=/work/cache nice -n 5 python benchmarks/quality.py --storage /work/quality --targets 0.25 --seeds 0,1,2 \
  --methods optuna-affine-bn-top6 --distill off --keep /tmp/qkeep-0365
