"""tokenmill.plugins: the in-tree backends, each registered through the `tokenmill.backends` entry points."""
