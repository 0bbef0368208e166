"""A tiny name -> factory registry shared by backbones, heads and losses (after timm's registry).

>>> HEADS = Registry("head")
>>> @HEADS.register("linear")
... def make_linear(in_features, num_classes): ...
>>> HEADS.create("linear", in_features=64, num_classes=10)   # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from pancls.errors import UserError


class Registry:
    """Maps names to factories; unknown names raise a :class:`UserError` that lists the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> List[str]:
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._factories[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def create(self, name: str, **kwargs: Any) -> Any:
        factory = self.get(name)
        try:
            return factory(**kwargs)
        except TypeError as exc:  # a misspelt option in the config
            raise UserError(f"{self.kind} {name!r}: {exc}") from None
