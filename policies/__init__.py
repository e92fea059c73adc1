"""Built-in skip policies. Each module is a plugin registered through ``register_policies``."""
