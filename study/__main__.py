"""``python -m study`` is the ``robust-study`` command."""

import sys

from study.cli import entry

sys.exit(entry())
