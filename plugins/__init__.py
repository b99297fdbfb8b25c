"""Built-in method plugins. Each module implements qbench hooks and is loaded like a third-party plugin."""
