"""Training recipes and demos built on :mod:`simplexvq` (import name ``simplexvq_recipes``)."""
