"""The `carve` command line."""
