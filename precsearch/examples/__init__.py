"""Built-in demo models and data."""
