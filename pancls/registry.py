"""A tiny name -> factory registry shared by backbones, heads and losses (after timm's registry).

>>> HEADS = Registry("head")
>>> @HEADS.register("linear")
... def make_linear(in_features, num_classes): ...
>>> HEADS.create("linear", in_features=64, num_classes=10)   # doctest: +SKIP
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional

from pancls.errors import UserError
from pancls.validation import InvalidParameter, check_choice
from pancls.validation import suggest as _suggest


class Registry:
    """Maps names to factories; unknown names raise a :class:`UserError` that lists the known ones and
    suggests the closest (as MONAI's ``look_up_option``)."""

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

    def get(self, name: str, where: Optional[str] = None) -> Callable[..., Any]:
        """The factory of ``name``; an unknown name is an :class:`~pancls.validation.InvalidParameter` naming
        ``where`` (the config key or argument it came from), listing the known names, suggesting the closest."""
        check_choice(name, where, self.names(), what=self.kind)
        return self._factories[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build ``name`` with ``kwargs``. Options are bound to the factory's signature first, so an unknown or
        missing option is a :class:`UserError` naming the accepted ones, while a ``TypeError`` raised inside
        the factory (a bug) keeps its traceback. An unknown option is an
        :class:`~pancls.validation.InvalidParameter` whose ``where`` is that option, so that a config boundary
        names it by its key (``model.head_kwargs.form``: a recipe's options for one head, kept under
        ``--head`` naming another)."""
        factory = self.get(name)
        signature = inspect.signature(factory)
        accepted = [p.name for p in signature.parameters.values()
                    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and not p.name.startswith("_")]
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            listed = f"; accepted: {', '.join(accepted) or 'none'}"
            unknown = [k for k in kwargs if k not in signature.parameters]
            if unknown:
                hint = _suggest(unknown[0], accepted)
                others = f" (and {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else ""
                raise InvalidParameter(f"not an option of {self.kind} {name!r}{hint}{others}{listed}",
                                       unknown[0]) from None
            raise UserError(f"{self.kind} {name!r}: {exc}{listed}") from None
        return factory(**kwargs)
