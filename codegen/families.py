"""Imports every kernel family so its emitters register (one module per family)."""
