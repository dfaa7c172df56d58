"""`python -m edgemeter.cli`: the `edgemeter` command where its console script is not on PATH
(the README's promise, and how the tests run it in a process of its own)."""

from __future__ import annotations

import sys

from edgemeter.cli.main import main

sys.exit(main())
