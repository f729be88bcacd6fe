"""``python -m inferd`` is the ``inferd`` command."""

import sys

from inferd.cli import main

sys.exit(main())
