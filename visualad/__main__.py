"""``python -m visualad ...`` runs the command line (the same as the ``visualad`` script)."""
import sys

from .cli import main

sys.exit(main())
