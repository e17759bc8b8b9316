"""The stages of a run, in data-flow order."""

from __future__ import annotations

from .runner import Stage


def all_stages() -> dict[str, Stage]:
    from queries.stage import QueriesStage

    stages = [QueriesStage()]
    return {s.name: s for s in stages}
