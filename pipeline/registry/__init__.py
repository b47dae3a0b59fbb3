"""The MLflow side: tracking runs, registering versions by content, the promotion policy, model cards, pyfuncs."""
