"""`python -m alignkit` (used under `accelerate launch -m alignkit ...`)."""

import sys

from alignkit.cli import main

sys.exit(main())
