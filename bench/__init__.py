"""Performance benchmarks (not tests): ``python -m bench NAME``; see the README for figures."""
