"""The outside world: storage backends by URI scheme, the output lock, MLflow tracking."""
