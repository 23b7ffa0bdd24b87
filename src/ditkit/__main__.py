"""``python -m ditkit`` is the ``ditkit`` command."""

import sys

from ditkit.cli import main

sys.exit(main())
