"""Which version answers a request: an immutable routing table per served model,
built from the config's traffic weights (version -> weight; none = all on the newest)
and replaced in one assignment on a swap."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from .version import ModelVersion


@dataclass(frozen=True)
class Routing:
    """An immutable routing table: replaced in one assignment on a swap."""

    versions: dict[int, ModelVersion]
    choices: tuple[int, ...]
    cumulative: tuple[float, ...]

    @classmethod
    def build(cls, versions: dict[int, ModelVersion], traffic: dict[str, float]) -> Routing:
        weights = {v: float(traffic.get(str(v), 0)) for v in versions}
        if not any(weights.values()):
            weights = {max(versions): 1.0} if versions else {}
        choices, cumulative, total = [], [], 0.0
        for version in sorted(weights):
            if weights[version] > 0:
                total += weights[version]
                choices.append(version)
                cumulative.append(total)
        return cls(dict(versions), tuple(choices), tuple(cumulative))

    def pick(self, rand: float) -> ModelVersion:
        index = bisect.bisect_right(self.cumulative, rand * self.cumulative[-1])
        return self.versions[self.choices[min(index, len(self.choices) - 1)]]


@dataclass
class ServedModel:
    name: str
    config: dict[str, Any]
    routing: Routing
    state: str = "READY"
    reason: str = ""
