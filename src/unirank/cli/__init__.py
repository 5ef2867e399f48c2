"""The `unirank` command line."""
