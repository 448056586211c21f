import sys
from pathlib import Path

import pytest
from llama_index.core.schema import NodeWithScore, TextNode

sys.path.insert(0, str(Path(__file__).parent))

CRANFIELD = Path(__file__).resolve().parents[1] / "data" / "cranfield"  # committed with the repository


def make_nodes(texts, start_score=1.0):
    return [
        NodeWithScore(node=TextNode(text=text, id_=f"n{i}", metadata={"source": f"doc{i}"}), score=start_score - i / 100)
        for i, text in enumerate(texts)
    ]


@pytest.fixture
def nodes():
    return make_nodes([f"passage about topic {i}" for i in range(12)])


@pytest.fixture
def cranfield_dir():
    return CRANFIELD
