"""The lean runner's two tunings of mitmproxy: event dispatch that asks only the addons
implementing an event, and startup objects frozen out of garbage collection. The meter installs
them into mitmdump's and mitmweb's too (`meter_tune_mitmproxy`), on the release they were proven on.

mitmproxy's stock manager walks every addon and its children for every event of every flow,
entering a context manager and a coroutine per addon even when it has no such hook. With
mitmdump's ~40 addons that walk is about half of mitmdump's CPU per request (measured in
docs/PERFORMANCE.md); calling the same hooks in the same order from a cached list removes it.
"""

# mypy: disallow-untyped-calls=False
# (mitmproxy's addon manager and hooks carry no annotations)
from __future__ import annotations

import gc
import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks
from mitmproxy.version import VERSION

logger = logging.getLogger(__name__)

# The mitmproxy release whose AddonManager HookCache was proven to match, addon arrangement by
# addon arrangement (tests/test_hookcache.py): install() leaves any other release's alone.
PROVEN_MITMPROXY = "12.2.3"

# (the top-level addon of the chain it belongs to, the hook)
Hooked = tuple[Any, Callable[..., Any]]


def _not_callable(name: str, addon: Any) -> Callable[..., Any]:
    def fail(*_args: Any) -> None:
        raise exceptions.AddonManagerError(f"Addon handler {name} ({addon}) not callable")

    return fail


class HookCache(addonmanager.AddonManager):
    """mitmproxy's addon manager, but each event calls only the addons that implement it.

    The hooks of an event are resolved once and kept until an addon is registered or removed
    or an option changes (scripts load, reload, unload and reorder through these). Behaviour
    is the stock manager's: same hooks, same order, awaitables awaited; an error is logged,
    skips the rest of that top-level addon's hooks for this event and the flow goes on;
    AddonHalt ends the event; OptionsError propagates."""

    _hooks: dict[str, list[Hooked]]

    def __init__(self, master: Any) -> None:
        super().__init__(master)
        self._hooks = {}
        master.options.changed.connect(self._forget)

    def _forget(self, *_args: Any, **_kwargs: Any) -> None:
        self._hooks.clear()

    def register(self, addon: Any) -> Any:
        self._hooks.clear()
        try:
            return super().register(addon)
        finally:
            self._hooks.clear()

    def remove(self, addon: Any) -> None:
        self._hooks.clear()
        super().remove(addon)
        self._hooks.clear()

    def clear(self) -> None:
        super().clear()
        self._hooks.clear()

    def hooked(self, name: str) -> list[Hooked]:
        found = self._hooks.get(name)
        if found is None:
            found = []
            for top in self.chain:
                for addon in addonmanager.traverse([top]):
                    func = getattr(addon, name, None)
                    if not func or isinstance(func, types.ModuleType):
                        continue  # e.g. `from mitmproxy import log` in a script: not a hook
                    found.append((top, func if callable(func) else _not_callable(name, addon)))
            self._hooks[name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        hooked = self.hooked(event.name)
        if not hooked:
            return
        args = event.args()
        failed = None
        for top, func in hooked:
            if top is failed:
                continue
            try:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:
                failed = top
                logger.error(f"Addon error: {e}", exc_info=True)

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        message = event.args()[0]
        # No addon shows flows (mitmdump without a UI): skip building update events nobody reads.
        if isinstance(message, flow.Flow) and self.hooked("update"):
            await self.trigger_event(hooks.UpdateHook([message]))


class InstalledHookCache(HookCache):
    """A stock manager turned into a HookCache in place by `install` (and back by `uninstall`)."""


def proven(version: str = VERSION) -> bool:
    """Whether this mitmproxy is the release the hook cache was proven against."""
    return version == PROVEN_MITMPROXY


def install(manager: Any) -> bool:
    """Make a running master's stock addon manager dispatch through a HookCache, in place (the
    master and its addons hold the very object). False, changing nothing, for any other
    manager (the lean runner's is one already, and a subclass is someone else's design) and
    on a mitmproxy release other than PROVEN_MITMPROXY."""
    if type(manager) is not addonmanager.AddonManager or not proven():
        return False
    swapped: Any = manager  # the narrowed type knows nothing of what it is turning into
    swapped._hooks = {}
    swapped.__class__ = InstalledHookCache
    swapped.master.options.changed.connect(swapped._forget)
    return True


def uninstall(manager: Any) -> bool:
    """Undo `install`; False if this manager was not installed by it."""
    if type(manager) is not InstalledHookCache:
        return False
    stock: Any = manager  # the narrowed type would refuse the class it is going back to
    stock.master.options.changed.disconnect(stock._forget)
    stock.__class__ = addonmanager.AddonManager
    # Emptied, not deleted: an options change being announced right now (the meter is told
    # to uninstall by one) still calls the listener taken off here.
    stock._hooks.clear()
    return True


def freeze() -> None:
    """Freeze what is alive now out of garbage collection. Startup leaves ~half a million
    long-lived objects (modules, options, certificates) that every full collection would walk,
    stalling the loop for 50-60 ms (measured in mitmdump); frozen, collections only see what the
    traffic creates."""
    gc.collect()
    gc.freeze()


def unfreeze() -> None:
    gc.unfreeze()
