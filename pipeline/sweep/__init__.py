"""Sweeps: Ray Tune over teacher subsets and hyper-parameters with resumable ASHA, and ranking teacher
subsets from the cache before any training."""
