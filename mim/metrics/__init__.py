"""Evaluators: ``reset`` / ``update`` / ``compute`` -> ``{metric: value}``."""
