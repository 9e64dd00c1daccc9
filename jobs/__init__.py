"""Entry points for ``ray job submit``: each parses a run config and calls one pipeline function."""
