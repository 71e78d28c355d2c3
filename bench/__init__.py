"""nodestepd's benchmark suite: `python -m bench` (see __main__.py and the README's Performance section)."""
