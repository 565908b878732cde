"""Putting a verified bundle in place on the target, and taking it away again.

install.py (plan, preflight glue, the atomic switch, pruning, health after the switch), lifecycle.py
(rollback, uninstall, clean, status), placement.py (the staged copy and extraction, the install journal),
state.py (the state record and the lock), layout.py (the install paths, from installer/bundle/names.py).
"""
