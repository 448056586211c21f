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


def test_both_import_paths_are_typed_packages_and_ship_their_marker():
    """mypy reads an installed package's types only with a ``py.typed`` beside its ``__init__`` (PEP 561); the
    wheel itself is checked by ``make test-base`` (tests/base_install_check.py)."""
    import re
    from pathlib import Path

    import llama_index.postprocessor.likelihood_rerank as llama_index_path

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    package_data = pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    for package in (llama_rerank, llama_index_path):
        assert Path(package.__file__).with_name("py.typed").is_file(), package.__name__
        assert re.search(rf'^"?{re.escape(package.__name__)}"? = \[[^\]]*"py\.typed"', package_data, re.M), package.__name__
