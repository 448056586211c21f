import llama_rerank


def test_public_surface_is_pinned():
    assert sorted(llama_rerank.__all__) == [
        "DEFAULT_SCALE", "LLMConfigError", "LabelScale", "LikelihoodRerank", "LlamaRerankError", "RerankLLMError",
        "RerankResult", "RerankUsage", "ScaleError", "StoreError", "__version__",
    ]
    for name in llama_rerank.__all__:
        assert hasattr(llama_rerank, name)


def test_errors_form_one_tree():
    for error in (llama_rerank.ScaleError, llama_rerank.RerankLLMError, llama_rerank.LLMConfigError, llama_rerank.StoreError):
        assert issubclass(error, llama_rerank.LlamaRerankError)
    assert issubclass(llama_rerank.ScaleError, ValueError)
