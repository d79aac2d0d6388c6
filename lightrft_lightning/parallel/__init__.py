"""Parallelism and model construction as plain functions over explicit arguments (no Lightning imports):
the Lightning strategies and the LightRFT API both call them."""
