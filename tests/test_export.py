"""`export`: lists as TRL preference pairs, read back by `datasets` and trained on by TRL's DPOTrainer."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import PipelineError
from core.layout import write_parquet
from core.schema import LISTS
from pipeline.export import best_worst, every_pair, preference_pairs
from tests.conftest import run_cli


def item(response: str, reward: float) -> dict:
    return {"response": response, "reward": reward, "sample_index": 0, "round": 1, "num_tokens": 3,
            "temperature": 0.8}


def write_lists(round_dir: Path) -> None:
    rows = [{"prompt_id": "p1", "prompt": [{"role": "user", "content": "Say hi."}],
             "positives": [item("hi", 1.0), item("hello", 0.9)],
             "negatives": [item("no", 0.2), item("bye", 0.1), item("meh", 0.5)], "metadata": "{}"},
            {"prompt_id": "p2", "prompt": [{"role": "user", "content": "Count."}],
             "positives": [item("1 2 3", 0.8)], "negatives": [item("one", 0.3)], "metadata": "{}"}]
    write_parquet(pa.Table.from_pylist(rows, schema=LISTS), round_dir / "lists" / "part-00000.parquet")


def test_best_worst_takes_the_best_positive_and_the_worst_negative():
    pairs = best_worst([item("a", 0.7), item("b", 0.9)], [item("c", 0.3), item("d", 0.1)])
    assert [(c["response"], r["response"]) for c, r in pairs] == [("b", "d")]


def test_every_pair_crosses_positives_and_negatives():
    pairs = every_pair([item("a", 0.7), item("b", 0.9)], [item("c", 0.3), item("d", 0.1)])
    assert [(c["response"], r["response"]) for c, r in pairs] == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]


def test_a_run_exports_every_round_in_conversational_format(tmp_path):
    write_lists(tmp_path / "run" / "round_001")
    write_lists(tmp_path / "run" / "round_002")
    (tmp_path / "run" / "round_003").mkdir()  # started, no lists yet: skipped
    table = preference_pairs(tmp_path / "run", "all").to_pylist()
    assert [row["round"] for row in table] == [1] * 7 + [2] * 7
    first = table[0]
    assert first["prompt"] == [{"role": "user", "content": "Say hi."}]
    assert first["chosen"] == [{"role": "assistant", "content": "hi"}]
    assert first["rejected"] == [{"role": "assistant", "content": "no"}]
    assert (first["chosen_reward"], first["rejected_reward"]) == (1.0, 0.2)


@pytest.mark.parametrize("form", ["trl", "hf"])
def test_cli_writes_what_datasets_reads(tmp_path, form):
    import datasets

    round_dir = tmp_path / "run" / "round_001"
    write_lists(round_dir)
    result = run_cli("export", str(round_dir), "--format", form, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 2 preference pairs (best-worst)" in result.stdout
    if form == "trl":
        data = datasets.load_dataset("parquet", data_files=str(round_dir / "export" / "preferences-best-worst.parquet"),
                                     split="train")
    else:
        data = datasets.load_from_disk(str(round_dir / "export" / "preferences-best-worst"))
    assert data["prompt_id"] == ["p1", "p2"]
    assert data[0]["chosen"][0]["content"] == "hi" and data[0]["rejected"][0]["content"] == "bye"


def test_a_directory_without_lists_is_refused_in_one_line(tmp_path):
    (tmp_path / "round_001").mkdir()
    with pytest.raises(PipelineError, match="round_001 has no lists/"):
        preference_pairs(tmp_path / "round_001", "best-worst")
    with pytest.raises(PipelineError, match="has no round with lists"):
        preference_pairs(tmp_path, "best-worst")
    result = run_cli("export", str(tmp_path / "missing"), timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "missing is not a directory" in result.stderr


@pytest.mark.e2e
def test_trl_dpo_trainer_trains_on_the_export_of_a_smoke_round(smoke_run, tiny_model, tmp_path):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    out = tmp_path / "pairs.parquet"
    result = run_cli("export", str(smoke_run / "round_001"), "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert len(data) > 0
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, max_steps=1,
                       learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                       dataloader_num_workers=0, logging_steps=1, max_length=256, seed=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    output = trainer.train()
    assert output.global_step == 1
    assert torch.isfinite(torch.tensor(output.training_loss))
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())


def export_cli(round_dir: Path, *args: str):
    return run_cli("export", str(round_dir), *args, timeout=300)


def one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().count("\n") == 0, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_hf_export_never_deletes_a_directory_it_did_not_write(tmp_path):
    round_dir = tmp_path / "run" / "round_001"
    write_lists(round_dir)
    victim = tmp_path / "victim"
    (victim / "important").mkdir(parents=True)
    (victim / "important" / "notes.txt").write_text("keep me")
    one_line_error(export_cli(round_dir, "--format", "hf", "--out", str(victim)),
                   "is not an earlier hf export", "--overwrite")
    assert (victim / "important" / "notes.txt").read_text() == "keep me"
    # An export may replace its own earlier export, and only --overwrite replaces anything else.
    ours = tmp_path / "ours"
    assert export_cli(round_dir, "--format", "hf", "--out", str(ours)).returncode == 0
    result = export_cli(round_dir, "--format", "hf", "--pairs", "all", "--out", str(ours))
    assert result.returncode == 0, result.stderr
    assert "wrote 7 preference pairs" in result.stdout
    assert export_cli(round_dir, "--format", "hf", "--out", str(victim), "--overwrite").returncode == 0
    assert not (victim / "important").exists()


@pytest.mark.parametrize("target", ["run", "round", "cwd"])
def test_hf_export_refuses_a_run_the_source_or_the_current_directory_even_with_overwrite(tmp_path, target):
    round_dir = tmp_path / "run" / "round_001"
    write_lists(round_dir)
    (tmp_path / "run" / "config.yaml").write_text("seed: 0\n")
    out = {"run": tmp_path / "run", "round": round_dir, "cwd": Path(".")}[target]
    result = export_cli(round_dir, "--format", "hf", "--out", str(out), "--overwrite")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert (round_dir / "lists" / "part-00000.parquet").is_file()
    assert (Path.cwd() / "pyproject.toml").is_file()


def test_export_path_mistakes_are_one_line(tmp_path):
    round_dir = tmp_path / "run" / "round_001"
    write_lists(round_dir)
    a_file = tmp_path / "a-file"
    a_file.write_text("not an export")
    (tmp_path / "a-dir").mkdir()
    one_line_error(export_cli(round_dir, "--out", "/proc/x.parquet"), "cannot write /proc/x.parquet")
    one_line_error(export_cli(round_dir, "--out", str(tmp_path / "a-dir")), "is a directory", "--format trl")
    one_line_error(export_cli(round_dir, "--format", "hf", "--out", str(a_file)), "is a file")
    one_line_error(export_cli(round_dir, "--out", str(a_file)), "is not an earlier trl export")
    assert a_file.read_text() == "not an export"
    one_line_error(export_cli(round_dir, "--out", str(tmp_path / "nonexistent" / "dir" / "x.parquet")),
                   "does not exist")
    assert not (tmp_path / "nonexistent").exists()
    # An earlier trl export is replaced without asking.
    out = tmp_path / "pairs.parquet"
    assert export_cli(round_dir, "--out", str(out)).returncode == 0
    result = export_cli(round_dir, "--out", str(out), "--pairs", "all")
    assert result.returncode == 0, result.stderr
    assert pq.read_table(out).num_rows == 7
