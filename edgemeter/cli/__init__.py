"""The `edgemeter` operator command (`edgemeter.cli.main`): status, tail, drain, dead letters,
fingerprints and the lean runner, one module per subcommand.
"""

from __future__ import annotations

from edgemeter.cli.main import main

__all__ = ["main"]
