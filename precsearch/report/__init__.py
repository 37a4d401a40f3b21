"""Showing what a search found: tables, ``report.md``/``report.html`` with plots, the output
directory and the side-by-side comparison of plans. Needs ``precsearch[search]``."""
