"""Benchmarks (step time, input pipeline, accuracy); see RESULTS.md."""
