"""Putting a verified bundle in place on the target, and taking it away again.

install.py (the install: stage, place, commit, switch), plan.py (the quick check and the plan), installed.py
(what is installed already), version_units.py (a version's unit configuration), switch.py (the switch, the
check after it, switching back, pruning), lifecycle.py (rollback, uninstall, clean, status), placement.py
(:class:`Installer`: bookkeeping, with journal.py, the undo log, and staging.py, the staged and verified
copies; conda_unpack.py relocates an environment), state.py (the state record and the lock), layout.py (the
install paths, from installer/bundle/names.py).
"""
