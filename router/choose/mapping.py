"""The second routing step: category -> expert, with a generalist for unsure prompts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CategoryMap:
    """Which expert answers each category; prompts below the threshold go to the generalist."""

    experts_by_category: Mapping[str, str]
    generalist: str
    experts: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        known = self.experts or frozenset({*self.experts_by_category.values(), self.generalist})
        object.__setattr__(self, "experts", known)
        if self.generalist not in known:
            raise ValueError(f"generalist {self.generalist!r} is not among experts {sorted(known)}")
        for category, expert in self.experts_by_category.items():
            if expert not in known:
                raise ValueError(f"category {category!r} maps to unknown expert {expert!r}")

    def expert_for(self, category: str) -> str:
        try:
            return self.experts_by_category[category]
        except KeyError:
            raise KeyError(f"no expert mapped for category {category!r}") from None

    def with_category(self, category: str, expert: str) -> CategoryMap:
        """A copy that also (or instead) sends `category` to `expert`; the rest is unchanged."""
        if expert not in self.experts:
            raise ValueError(f"category {category!r} maps to unknown expert {expert!r}")
        return CategoryMap(
            {**self.experts_by_category, category: expert}, self.generalist, self.experts
        )

    @classmethod
    def from_assignment(
        cls, assignment: Mapping[str, str], generalist: str, experts: frozenset[str] = frozenset()
    ) -> CategoryMap:
        """From an optimiser's MapChoice.assignment (category -> expert)."""
        return cls(dict(assignment), generalist, experts)
