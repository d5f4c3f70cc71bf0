"""`python -m steerscope ...` is the `steerscope` command."""

import sys

from .cli import main

sys.exit(main())
