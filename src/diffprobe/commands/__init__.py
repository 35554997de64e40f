"""CLI commands of the analysis layers; each module has ``register(app)``."""
