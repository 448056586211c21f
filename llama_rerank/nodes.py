"""One rerank's nodes: ``NodeWithScore`` in, plain candidates packed into windows, scored node copies out.

:class:`Run` deduplicates the input by node id (a node is judged and returned once, at its best retrieval rank),
cuts each passage to the token budget, sets aside nodes with no text, and packs the rest into windows;
:meth:`Run.finish` orders the judged candidates (:mod:`llama_rerank.scoring`: fusion, cutoff, ties by retrieval
rank), puts the textless nodes after them, and copies the top ones with the rerank metadata. Everything it needs is
passed in: it knows nothing of the reranker that runs it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, List, Literal, Sequence

from llama_index.core.schema import MetadataMode, NodeWithScore

from llama_rerank.budget import Encode, pack_windows, truncate
from llama_rerank.prompts import fence_tokens
from llama_rerank.scoring import fuse, order
from llama_rerank.types import Candidate, Judgement, RerankUsage

logger = logging.getLogger(__name__)

METADATA_KEYS = ("rerank_label", "rerank_score", "retrieval_score", "retrieval_rank")


@dataclass(frozen=True)
class Ranking:
    """How judged candidates become the output: fusion with retrieval, the cutoff, how many nodes to return."""

    top_n: int
    cutoff: float | None  # judged candidates scoring below it are dropped
    retrieval_weight: float
    retrieval_signal: Literal["rank", "score"]
    normalize: bool
    textless_score: float  # the score a node with no text gets (the scale's lowest)


class Run:
    """One rerank's state: candidates prepared from the nodes, their windows, judgements, usage and output.

    ``budget`` gives the tokens a window leaves for passages (it may raise when the prompt leaves too few); it is
    asked only when some node has text.
    """

    def __init__(
        self,
        query: str,
        nodes: Sequence[NodeWithScore],
        encode: Encode,
        max_passage_tokens: int,
        window_size: int,
        budget: Callable[[], int],
    ) -> None:
        self.query, self.nodes = query, list(nodes)
        self.started = time.perf_counter()
        self.usage = RerankUsage()
        self.judgements: dict[int, Judgement] = {}
        self.output: list[NodeWithScore] = []  # set by finish()
        self.unique: list[NodeWithScore] = []
        self.ranks: list[int] = []
        seen: set[str] = set()
        repeated: list[int] = []
        for rank, node in enumerate(self.nodes, start=1):
            if node.node.node_id in seen:
                repeated.append(rank)
                continue
            seen.add(node.node.node_id)
            self.unique.append(node)
            self.ranks.append(rank)
        if repeated:
            logger.warning(
                "%d input node(s) repeat a node id seen earlier (retrieval ranks %s); each node is judged and returned "
                "once, at its best retrieval rank", len(repeated), repeated,
            )  # fmt: skip
        self.candidates: list[Candidate] = []
        self.textless: list[int] = []
        for index, node in enumerate(self.unique):
            content = node.node.get_content(metadata_mode=MetadataMode.LLM)
            if content.strip():
                text, tokens = truncate(content, max_passage_tokens, encode)
                self.candidates.append(Candidate(index, text, tokens, node.score))
            else:
                self.textless.append(index)
        self.windows = (
            pack_windows(self.candidates, window_size, budget(), fence_tokens(encode), encode) if self.candidates else []
        )

    def finish(self, ranking: Ranking) -> None:
        """Set ``output``, best first: the judged nodes ordered and cut, then the textless ones; at most
        ``ranking.top_n``. Records the run's wall time in ``usage``."""
        final = fuse(self.candidates, self.judgements, ranking.retrieval_weight, ranking.retrieval_signal, ranking.normalize)
        ranked = order(self.candidates, self.judgements, final, ranking.cutoff)
        chosen = [(c.index, self.judgements[c.index], final[c.index]) for c in ranked]
        floor = ranking.textless_score
        chosen += [(index, Judgement(None, floor, "no_text"), floor) for index in self.textless]
        self.output = [self._output(*choice) for choice in chosen[: ranking.top_n]]
        self.usage.wall_time_s = time.perf_counter() - self.started

    def _output(self, index: int, judgement: Judgement, score: float) -> NodeWithScore:
        """A copy of the input node carrying the rerank metadata; the caller's node is left untouched."""
        source = self.unique[index]
        node = source.node
        metadata = {
            **node.metadata,
            "rerank_label": judgement.label,
            "rerank_score": judgement.score,
            "retrieval_score": source.score,
            "retrieval_rank": self.ranks[index],
        }
        copy = node.model_copy(
            update={
                "metadata": metadata,
                "excluded_llm_metadata_keys": _with_keys(node.excluded_llm_metadata_keys),
                "excluded_embed_metadata_keys": _with_keys(node.excluded_embed_metadata_keys),
            }
        )
        return NodeWithScore(node=copy, score=score)


def _with_keys(keys: List[str]) -> List[str]:
    return [*keys, *(k for k in METADATA_KEYS if k not in keys)]
