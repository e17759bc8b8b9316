"""The stages of a run, in data-flow order."""

from __future__ import annotations

from .runner import Stage


def all_stages() -> dict[str, Stage]:
    from pipelines.balance import BalanceStage
    from pipelines.candidates import CandidatesStage
    from pipelines.dedup import DedupStage
    from pipelines.download import DownloadStage
    from pipelines.filter import FilterStage
    from pipelines.match import MatchStage
    from pipelines.shard import ShardStage
    from queries.stage import QueriesStage

    stages = [QueriesStage(), CandidatesStage(), FilterStage(), MatchStage(), DownloadStage(), DedupStage(), BalanceStage(), ShardStage()]
    return {s.name: s for s in stages}
