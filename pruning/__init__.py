"""The pruning core shared by every method and search: models, data, space, policy, importance,
surgery, measurement and training. Never imports ray or mlflow."""
