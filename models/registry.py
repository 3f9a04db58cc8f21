"""Name -> constructor registries, one per ablation axis (DiT's `DiT_models` dict, with loud failures).

The same keys feed the CLI's choices, config validation and Optuna's categorical choices, so a typo is
an error before any compute - never a silent fallback to the baseline.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """`" (did you mean 'uniform'?)"` for a near miss such as 'unifrom', else "" (difflib's ratio >= 0.6)."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """An ordered mapping from a public name to a constructor."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: `@SAMPLERS.register("uniform")`."""

        def deco(ctor: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = ctor
            return ctor

        return deco

    def get(self, name: str) -> Callable[..., T]:
        """The constructor for `name`; unknown names raise KeyError listing the known ones."""
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._items)}; "
                           f"choose one of {list(self._items)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items  # a list or table from a spec is simply not a name

    def __len__(self) -> int:
        return len(self._items)
