"""`python -m notifier` is the same as the `notifier` console script."""

import sys

from notifier.cli import main

sys.exit(main())
