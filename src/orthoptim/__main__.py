"""``python -m orthoptim`` runs the benchmark command line (see :mod:`orthoptim.cli`)."""

import sys

from orthoptim.cli import main

sys.exit(main())
