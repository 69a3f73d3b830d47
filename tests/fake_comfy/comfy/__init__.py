"""Fake `comfy` package (see tests/fake_comfy/README.md)."""
