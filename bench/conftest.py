"""Shared fixtures for the micro benchmarks."""
