"""The search: config, trial, Ray Tune searcher adapter, tuner, resume and the CLI."""
