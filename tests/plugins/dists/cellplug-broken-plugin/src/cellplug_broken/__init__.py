"""A deliberately broken cellplug plugin (test suite only)."""
