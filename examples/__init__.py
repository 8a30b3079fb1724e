"""Runnable examples (see each file's docstring). A package so `--app examples.order_app:runtime` imports."""
