"""Example cellplug plugin (test suite only)."""
