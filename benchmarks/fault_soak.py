"""The fault soak, full size: concurrent reranks with cancellations and deadlines through a fault-injecting proxy.

Asyncio reranks (plain, under ``asyncio.wait_for``, or cancelled with ``task.cancel()``) and sync reranks on
threads share one ``LikelihoodRerank`` whose ``OpenAILike`` talks, through the real ``openai`` client, to a proxy on
127.0.0.1 that resets connections, delays, cuts and trickles replies and answers bursts of 429/500/503, in front of
the stub server of the test suite. It prints the figures the soak counts (see tests/soak.py) and what each must be.
Nothing leaves the machine; the run stops by itself.

    python benchmarks/fault_soak.py [--seed 0] [--task-reranks 120] [--thread-reranks 24] [--deadline S] [--small]

``--small`` is the size the test suite runs (tests/test_fault_soak.py). It uses the stub server and the proxy of
the test suite, so it puts tests/ on ``sys.path``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]

from common import machine_header  # noqa: E402
from soak import Plan, small, soak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, help="default: 0, or with --small the test's seed")
    parser.add_argument("--task-reranks", type=int, default=Plan.task_reranks)
    parser.add_argument("--thread-reranks", type=int, default=Plan.thread_reranks)
    parser.add_argument("--deadline", type=float, help="the reranker's whole-rerank deadline (seconds)")
    parser.add_argument("--small", action="store_true", help="the test suite's size")
    args = parser.parse_args()
    if args.small:
        plan = small() if args.seed is None else small(args.seed)
    else:
        plan = Plan(seed=args.seed or 0, task_reranks=args.task_reranks, thread_reranks=args.thread_reranks)
    plan = dataclasses.replace(plan, deadline=args.deadline)
    logging.basicConfig(level=logging.ERROR)  # the reranker's retry warnings would drown the table
    print(machine_header("Fault soak: concurrent reranks, cancellations and deadlines through a fault proxy"))
    print("plan        : " + ", ".join(f"{f.name}={getattr(plan, f.name)}" for f in dataclasses.fields(plan)))
    print(f"worst case  : {plan.worst_case():.1f} s for a rerank without a deadline of the caller's\n")
    print(soak(plan).table())


if __name__ == "__main__":
    main()
