"""Fake WebUI `modules` package (see tests/fake_webui/README.md)."""
