"""Built-in velocity backends. Each module is a plugin registered through ``register_backends``."""
