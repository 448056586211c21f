import sys
from pathlib import Path

import pytest
from llama_index.core.schema import NodeWithScore, TextNode

sys.path.insert(0, str(Path(__file__).parent))



def make_nodes(texts, start_score=1.0):
    return [
        NodeWithScore(node=TextNode(text=text, id_=f"n{i}", metadata={"source": f"doc{i}"}), score=start_score - i / 100)
        for i, text in enumerate(texts)
    ]


@pytest.fixture
def nodes():
    return make_nodes([f"passage about topic {i}" for i in range(12)])


def collection(name: str) -> Path:
    """A public evaluation collection, never committed here: skip the test where it is absent (a user's clone)."""
    from llama_rerank.eval import EvalError
    from llama_rerank.eval.datasets import collection_dir

    try:
        return collection_dir(name)
    except EvalError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def cranfield_dir():
    return collection("cranfield")


@pytest.fixture
def scifact_dir():
    return collection("scifact")
