"""`python -m edgemeter.cli`: the `edgemeter` command without its console script."""

import sys

from edgemeter.cli.main import main

sys.exit(main())
