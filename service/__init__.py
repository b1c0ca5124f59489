"""Parrot service: HTTP API, engines and kernels."""
