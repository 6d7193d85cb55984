"""Benchmarks behind `quickloris bench ...`; results carry provenance (utils/provenance.py)."""
