"""``python -m installer.preflight``: see installer/preflight/cli.py."""

import sys

from installer.preflight.cli import main

sys.exit(main())
