"""LikelihoodRerank inside real LlamaIndex query engines over an embedded Chroma, with the real local embeddings."""

import pytest
from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import TextNode

from fakes import ScriptedLLM, passages
from llama_rerank import LikelihoodRerank
from llama_rerank.store import vector_store

DOCS = {
    "jet": "Jet engines compress air, burn fuel and expel hot gas to produce thrust.",
    "prop": "Propellers convert shaft power into thrust by accelerating a large mass of air.",
    "wing": "Swept wings delay the onset of compressibility drag at high subsonic speeds.",
    "flap": "Flaps increase lift at low speed by raising the camber of the wing.",
    "rocket": "Rockets carry their own oxidiser and so produce thrust outside the atmosphere.",
}


def judge(prompt: str, call: int) -> str:
    found = passages(prompt)
    if not found:  # the response synthesizer's prompt
        return "Rockets carry oxidiser."
    return "\n".join(f"[{i}] {'very likely' if 'oxidiser' in text else 'unlikely'}" for i, text in enumerate(found, 1))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from llama_rerank.runtime import LocalEmbedding

    embed = LocalEmbedding()
    store = vector_store(tmp_path_factory.mktemp("chroma"), "integration", embed, create=True)
    nodes = [TextNode(text=text, id_=key) for key, text in DOCS.items()]
    return VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store), embed_model=embed)


def _check(response, llm):
    assert [n.node.node_id for n in response.source_nodes] == ["rocket", "jet"]
    assert response.source_nodes[0].node.metadata["rerank_label"] == "very likely"
    assert response.source_nodes[0].node.metadata["retrieval_rank"] > 1  # the reranker moved it up
    assert str(response) == "Rockets carry oxidiser."
    assert "rerank_label" not in llm.prompts[-1]  # our metadata never reaches the synthesizer's prompt


def test_as_query_engine_with_node_postprocessors(index):
    llm = ScriptedLLM(judge)
    engine = index.as_query_engine(llm=llm, similarity_top_k=5, node_postprocessors=[LikelihoodRerank(llm=llm, top_n=2)])
    _check(engine.query("Which engine burns fuel to make thrust?"), llm)


async def test_retriever_query_engine_async(index):
    llm = ScriptedLLM(judge)
    engine = RetrieverQueryEngine.from_args(
        index.as_retriever(similarity_top_k=5), llm=llm, node_postprocessors=[LikelihoodRerank(llm=llm, top_n=2)]
    )
    _check(await engine.aquery("Which engine burns fuel to make thrust?"), llm)
