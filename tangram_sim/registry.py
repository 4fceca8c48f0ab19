"""Named registries so that policies are chosen from config by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from tangram_sim.errors import ConfigError, shown

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a config name to a factory. `create` raises ConfigError listing the known names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._renamed: dict[str, str] = {}  # former name -> current name (no alias: only a hint)

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {shown(name)} registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def renamed(self, old: str, new: str) -> None:
        """`old` is no longer a name; the unknown-name message points to `new` instead."""
        self._renamed[old] = new

    def unknown(self, name: object) -> str:
        """The message for a name that is not registered: the known names, and the new name of a
        renamed one."""
        new = self._renamed.get(name) if isinstance(name, str) else None
        hint = f" ({name} was renamed {new})" if new else ""
        return f"unknown {self.kind} {shown(name)}{hint}; expected one of: {', '.join(self.names())}"

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def needs(self, name: str) -> frozenset[str]:
        """What the policy registered as `name` declares it needs from the run (its class attribute
        `needs`, empty when it has none); `tangram_sim.policies.needs` says what a run provides."""
        try:
            factory = self._factories[name]
        except KeyError:
            raise ConfigError(self.unknown(name)) from None
        needs = getattr(factory, "needs", frozenset())
        if isinstance(needs, str) or not all(isinstance(n, str) for n in needs):
            raise ConfigError(f"{self.kind} {shown(name)}: needs must be a set of names, got {shown(needs)}")
        return frozenset(needs)

    def create(self, name: str, **params: object) -> T:
        try:
            factory = self._factories[name]
        except KeyError:
            raise ConfigError(self.unknown(name)) from None
        try:
            return factory(**params)
        except TypeError as exc:
            raise ConfigError(f"bad parameters for {self.kind} {shown(name)}: {exc}") from None
