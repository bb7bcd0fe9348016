"""What the sink tells the engine about a write."""

from __future__ import annotations

from dataclasses import dataclass, field

from syncd.errors import RecordError


@dataclass(slots=True)
class ApplyResult:
    run_id: str
    experiment_id: str
    created: bool
    problems: list[RecordError] = field(default_factory=list)
    uploaded: dict[str, str] = field(default_factory=dict)  # artifact key -> digest
