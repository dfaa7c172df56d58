"""edgemeter meters LLM API traffic at the network edge: a mitmproxy addon (`Meter`) that prices
every billable response and publishes one usage envelope per request to NATS JetStream.

    from edgemeter import Meter        # what `mitmdump -s addons/meter.py` loads
    addons = [Meter()]

`Meter` is imported on first use, so the pure metering wing (`edgemeter.metering`) and the CLI
load without mitmproxy.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from edgemeter.errors import MeterError

if TYPE_CHECKING:
    from edgemeter.addon import Meter
    from edgemeter.settings import Settings

try:
    __version__ = version("edgemeter")
except PackageNotFoundError:  # a checkout run without installing it
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "Meter":
        from edgemeter.addon import Meter

        return Meter
    if name == "Settings":
        from edgemeter.settings import Settings

        return Settings
    raise AttributeError(f"module 'edgemeter' has no attribute {name!r}")


__all__ = ["Meter", "MeterError", "Settings", "__version__"]
