"""`python -m steerscope.cli ...` is the `steerscope` command (the package is imported once, as
`steerscope.cli`; only this file runs as `__main__`)."""

import sys

from . import main

sys.exit(main())
