"""A real browser for the tests where a person would look: Debian's Chromium, installed with
apt-get when missing (CI runs as root on Debian), driven by Playwright (never its own browser).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

CHROMIUM: Final = Path("/usr/bin/chromium")
# The flow list's marks are emoji: without a colour emoji font a screenshot shows boxes.
EMOJI_FONT: Final = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
PACKAGES: Final = ("chromium", "fonts-noto-color-emoji")
# The machine's network is closed: without these Chromium spends its time on connections for
# updates, sync and field trials that fail.
CHROMIUM_ARGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def ensure_chromium() -> Path:
    """Debian's Chromium (and the emoji font), installed if missing: a no-op when present."""
    if CHROMIUM.exists() and EMOJI_FONT.exists():
        return CHROMIUM
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise RuntimeError(
            f"{CHROMIUM} is missing and cannot be installed from here (needs root and "
            f"apt-get): run `apt-get install -y {' '.join(PACKAGES)}`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", *PACKAGES]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        # A fresh machine may have no package lists yet, or stale ones.
        subprocess.run([apt, "update"], env=env, capture_output=True, timeout=900, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not CHROMIUM.exists():
        raise RuntimeError(
            f"apt-get could not install {' '.join(PACKAGES)} "
            f"(exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return CHROMIUM
