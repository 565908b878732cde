"""``python -m installer ...``: see installer.cli."""

import sys

from installer.cli import main

sys.exit(main())
