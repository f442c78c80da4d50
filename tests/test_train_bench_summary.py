"""bench/train_bench.py's Trainer section of docs/results.md, from hand-made result files."""

from bench.train_bench import trainer_section


def case(tokens_per_second: float, peak: float, seconds_per_prompt: float = 2.0) -> dict:
    return {"tokens_per_second": tokens_per_second, "peak_rss_gib": peak, "seconds_per_prompt": seconds_per_prompt}


SETTINGS = {"prompts": 16, "batch": 4, "steps": 3}


def test_ratios_are_taken_against_the_same_files_trl_case():
    text = trainer_section({"a.json": {"trl": case(80.0, 4.0), "ours-k2-lean-gc": case(96.0, 2.4),
                                       "settings": SETTINGS},
                            "b.json": {"trl": case(60.0, 4.0), "ours-k2": case(90.0, 4.4), "settings": SETTINGS}},
                           "test machine")
    assert "| 96.0 | 2.00 | 2.40 | 1.20x | 0.60x |" in text
    assert "| 90.0 | 2.00 | 4.40 | 1.50x | 1.10x |" in text
    assert "Machine: test machine." in text
    # 1.5x speed and 0.6x memory are each reached, but by different cases: not met.
    assert "not met by any case" in text


def test_joint_target_met_by_one_case_is_named():
    text = trainer_section({"a.json": {"trl": case(60.0, 4.0), "ours-k2-lean": case(90.0, 2.4), "settings": SETTINGS}},
                           "m")
    assert "met by: ours-k2-lean in `a.json`" in text
    assert "not met" not in text


def test_k4_per_prompt_cost_against_k2():
    text = trainer_section({"a.json": {"ours-k2": case(100.0, 4.0, 2.0), "ours-k4": case(120.0, 5.0, 3.4),
                                       "settings": SETTINGS}}, "m")
    assert "K=4 costs 1.70x pairwise K=2 per prompt" in text
    # Without a TRL case in the file there is nothing to compare against.
    assert "| - | - |" in text


def test_step_tokens_start_over_when_the_prompts_run_out():
    from bench.train_bench import step_tokens

    # 5 prompts, 2 a step: the third step takes the last prompt and the first again.
    assert step_tokens([10, 20, 30, 40, 50], batch=2, steps=4) == [30, 70, 60, 50]


def test_huge_pages_are_off_for_our_workers_unless_the_caller_turns_them_on(monkeypatch):
    from bench.train_bench import case_env
    from stages.train.stage import worker_env

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert worker_env() == {"THP_MEM_ALLOC_ENABLE": "0"}
    assert case_env("ours-k2")["THP_MEM_ALLOC_ENABLE"] == "0"
    assert case_env("trl-thp")["THP_MEM_ALLOC_ENABLE"] == "1"
    assert "THP_MEM_ALLOC_ENABLE" not in case_env("trl")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert worker_env() == {"THP_MEM_ALLOC_ENABLE": "1"} and case_env("ours-k2")["THP_MEM_ALLOC_ENABLE"] == "1"
    assert "THP_MEM_ALLOC_ENABLE" not in case_env("trl")  # TRL's default case stays in the plain allocator


def test_each_file_says_whether_ours_ran_with_huge_pages():
    text = trainer_section({"old.json": {"trl": case(80.0, 4.0), "settings": SETTINGS},
                            "new.json": {"trl": case(80.0, 4.0), "settings": {**SETTINGS, "ours_huge_pages": "0"}}},
                           "test machine")
    assert "`old.json` (16 prompts, 4 per step, 3 timed steps; ours with THP_MEM_ALLOC_ENABLE=1;" in text
    assert "`new.json` (16 prompts, 4 per step, 3 timed steps; ours with THP_MEM_ALLOC_ENABLE=0;" in text
