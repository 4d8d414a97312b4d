"""Reproducible benchmarks of lightning-unlearn (kept out of the engine): `python -m benchmarks.run --preset NAME`."""
