"""The pruning methods: baselines, ARPruning, DCP-A, DCM and CDP+DTC. Never imports ray or mlflow."""
