"""The product surface, apart from the library core: the CLI, the demo, plots, the comparison harness
and the built-in models used by both."""
