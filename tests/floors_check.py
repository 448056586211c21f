"""Run by ``make test-floors`` in its venv: every direct requirement is installed at the lower bound pyproject.toml
declares, so the fast suite that follows tests the declared floors (not versions a resolver had to raise)."""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version


def main() -> int:
    wrong = []
    for text in metadata.requires("llama-rerank") or []:
        req = Requirement(text)
        if req.name == "llama-rerank":
            continue  # an extra that names other extras
        floor = next((Version(s.version) for s in req.specifier if s.operator in (">=", "==")), None)
        installed = Version(metadata.version(req.name))
        if floor is None or installed != floor:
            wrong.append(f"{req.name}: declared {req.specifier or 'no bound'}, installed {installed}")
    if wrong:
        print("floors not installed as declared (raise them in pyproject.toml):\n  " + "\n  ".join(sorted(set(wrong))))
        return 1
    print(f"every direct requirement is at its declared floor ({len(metadata.requires('llama-rerank'))} requirements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
