"""edgemeter's meter for mitmproxy's `-s`: `mitmdump -s addons/meter.py --mode reverse:URL`.

The addon lives in the package (edgemeter.addon); this script only hands it to mitmproxy.
"""

from edgemeter import Meter

addons = [Meter()]
