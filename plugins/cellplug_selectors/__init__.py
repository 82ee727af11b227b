"""Default style selectors for ``--model auto``."""
