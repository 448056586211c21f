"""Does a synthetic ``tune`` tell the truth? Compare two finished ``llama-rerank tune`` runs on the same documents:
one on synthetic questions, one on the collection's real judged queries.

Both folders are read as ``tune`` left them (``queries.jsonl``, ``judged.jsonl``, ``settings.json``); nothing is
sent to an LLM. Printed: each run's held-out verdict (first stage against its chosen setting, nDCG@10 with the
bootstrap interval of the gain and the paired p-values); the settings both runs tried, scored on each run's tune
split, with the agreement of their order (Kendall's tau) and each run's pick; and the synthetic run's calibration
measured against the real judgements: its expected calibration error on the judged run's held-out candidates (scored
at the synthetic run's fusion weight), beside the score read as a probability and beside a calibration fitted on
the real judgements' tune split.

    llama-rerank tune cranfield --out tune-cranfield-synthetic --n-queries 40
    llama-rerank tune cranfield --out tune-cranfield-judged --queries cranfield --n-queries 40
    python benchmarks/synthetic_vs_judged.py tune-cranfield-synthetic tune-cranfield-judged
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from scipy.stats import kendalltau

from llama_rerank.eval.metrics import NDCG
from llama_rerank.tune import calibration, questions as qs, run, sweep
from llama_rerank.tune.calibration import Calibration


class Finished:
    """A finished tune folder: its questions, split, judged records per (K, window) and settings."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.questions = qs.from_file(folder / "queries.jsonl")
        self.tune, self.held = sweep.split(self.questions)
        self.judged: dict[tuple[int, int], dict[str, sweep.Judged]] = defaultdict(dict)
        for _, k, window, _, judged in sweep.read_judged(folder / sweep.JUDGED_FILE):
            self.judged[(k, window)][judged.query_id] = judged
        self.settings = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
        options = self.settings["reranker"]
        self.chosen = sweep.Setting(self.settings["top_k"], options["window_size"], options["retrieval_weight"])

    def pairs(self, questions: list[qs.Question]) -> set[tuple[int, int]]:
        """The (K, window) pairs judged for every one of ``questions``."""
        return {pair for pair, by_query in self.judged.items() if all(q.id in by_query for q in questions)}

    def scores(self, setting: sweep.Setting, questions: list[qs.Question]) -> sweep.Scores:
        """``setting`` on ``questions``; the first stage (no window) reads any pair judged at its K."""
        window = setting.window or min(w for k, w in self.pairs(questions) if k == setting.k)
        return sweep.score(setting, self.judged[(setting.k, window)], questions, [self.settings["reranker"]["top_n"]])

    def first_stage(self, questions: list[qs.Question]) -> sweep.Scores:
        return self.scores(sweep.Setting(max(k for k, _ in self.pairs(questions)), None, None), questions)


def verdict(name: str, run_: Finished) -> str:
    first, chosen = run_.first_stage(run_.held), run_.scores(run_.chosen, run_.held)
    stats = run.held_out_stats(first, chosen, run_.settings["reranker"]["top_n"], None, seed=0)["metrics"][NDCG]
    low, high = stats["gain_ci"] or (float("nan"), float("nan"))
    p = {name: "-" if value is None else f"{value:.2f}" for name, value in stats["p"].items()}
    return (f"| {name} | {len(run_.tune)} / {len(run_.held)} | {run_.chosen.name} | {stats['first_stage']:.4f} | "
            f"{stats['reranked']:.4f} | {stats['gain']:+.4f} [{low:+.3f}, {high:+.3f}] | {p['ttest_rel']} / {p['wilcoxon']} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("synthetic", type=Path, help="the tune folder of the run on synthetic questions")
    parser.add_argument("judged", type=Path, help="the tune folder of the run on the real judged queries")
    parser.add_argument("--weights", default="0,0.25,0.5,0.75", help="the fusion weights both runs tried (tune's default)")
    args = parser.parse_args()
    synthetic, judged = Finished(args.synthetic), Finished(args.judged)

    print("## Held-out verdicts (nDCG@10; the gain's 95% bootstrap interval; p: paired t / Wilcoxon)\n")
    print("| questions | tune / held out | chosen setting | first stage | reranked | gain | p |")
    print("|---|---|---|---|---|---|---|")
    print(verdict("synthetic", synthetic))
    print(verdict("real judgements", judged))

    weights = [float(w) for w in args.weights.split(",")]
    common = sorted(synthetic.pairs(synthetic.tune) & judged.pairs(judged.tune))
    settings = [sweep.Setting(k, None, None) for k in sorted({k for k, _ in common})]
    settings += [sweep.Setting(k, w, weight) for k, w in common for weight in weights]
    rows = [(s, synthetic.scores(s, synthetic.tune).mean(NDCG), judged.scores(s, judged.tune).mean(NDCG)) for s in settings]
    tau = kendalltau([r[1] for r in rows], [r[2] for r in rows])
    print(f"\n## The settings tried, on each run's tune split (nDCG@10): Kendall's tau {tau.statistic:+.2f} (p {tau.pvalue:.2f})\n")
    print("| setting | synthetic | real judgements |")
    print("|---|---|---|")
    for setting, a, b in rows:
        marks = ("  (synthetic's pick)" if setting == synthetic.chosen else "") + ("  (real's pick)" if setting == judged.chosen else "")
        print(f"| {setting.name}{marks} | {a:.4f} | {b:.4f} |")

    # the synthetic calibration, measured on real judgements: the judged run's held-out candidates at the synthetic
    # run's chosen window and fusion weight (its K's candidates where judged, else the judged run's own pair)
    pair = (synthetic.chosen.k, synthetic.chosen.window)
    pair = pair if pair in judged.pairs(judged.held) else (judged.chosen.k, judged.chosen.window)
    at = sweep.Setting(*pair, synthetic.chosen.weight)
    x_held, y_held, _ = run.points(judged.scores(at, judged.held))
    x_tune, y_tune, _ = run.points(judged.scores(at, judged.tune))
    own = calibration.fit(x_tune, y_tune)
    fitted = Calibration.from_dict(synthetic.settings["calibration"]) if synthetic.settings.get("calibration") else None
    print(f"\n## Calibration against the real judgements ({len(x_held)} held-out candidates of the judged run, "
          f"{sum(y_held)} relevant; {at.name})\n")  # fmt: skip
    print("| probability | ECE | mean predicted | share relevant |")
    print("|---|---|---|---|")
    share = sum(y_held) / len(y_held)
    for name, probability in [("the score read as a probability", lambda x: min(max(x, 0.0), 1.0)),
                              ("synthetic calibration", fitted), ("calibration fitted on the real tune split", own)]:  # fmt: skip
        if probability is None:
            print(f"| {name} | not fitted | | |")
            continue
        p = [probability(x) for x in x_held]
        print(f"| {name} | {calibration.ece(p, y_held):.3f} | {sum(p) / len(p):.3f} | {share:.3f} |")


if __name__ == "__main__":
    main()
