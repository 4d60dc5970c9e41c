"""Recipes: one module per command, each a thin `run(config)` over the library."""
