"""Default annotation sources."""
