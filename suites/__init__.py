"""Built-in measurement suites. Each module implements qbench hooks and is loaded like a third-party plugin."""
