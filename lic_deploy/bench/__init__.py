"""Benchmarks: latency, rate-distortion, BD-rate, outliers, reports."""
