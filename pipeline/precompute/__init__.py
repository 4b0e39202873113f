"""Precompute: the teacher once per (sample, view), units written to the store; locally or as a Ray job."""
