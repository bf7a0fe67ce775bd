"""``python -m torchwatch``."""

import sys

from .cli import main

sys.exit(main())
