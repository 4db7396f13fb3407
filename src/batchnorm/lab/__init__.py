"""The lab: models, data, training, explain, experiments, grid search, reports and benchmarks (built on the layers)."""
