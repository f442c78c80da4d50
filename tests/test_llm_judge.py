"""The llm_judge reward: its parsers, the listwise shuffle, retries, templates and config, with fake
engines; and one smoke round judged by the embedded SmolLM2 through vLLM."""

import json
import math
import re

import pytest

from core.errors import ConfigError
from rewards import REWARDS, Sample, build_reward_from_config
from rewards.base import needs_whole_prompts
from rewards.llm_judge import (DEFAULT_SCORE_PATTERN, LlmJudge, answers_text, default_template, load_template,
                               order_scores, parse_order, parse_score, prompt_text, shuffled)

PROMPT = [{"role": "user", "content": "Tell me about tea."}]
JUDGE = "embedded:smollm2-135m-instruct"


def samples(answers, prompt_id="p", prompt=PROMPT):
    return [Sample(prompt_id, prompt, answer, {}) for answer in answers]


class KeywordEngine:
    """A judge that prefers answers saying `keyword` more often, whatever their position; it records
    what it was asked. `junk(message, temperature)` may make it reply with nonsense instead."""

    def __init__(self, keyword="tea", junk=lambda message, temperature: False):
        self.keyword, self.junk = keyword, junk
        self.asked: list[tuple[str, float]] = []

    def complete(self, messages, reply_prefix, stop, temperature):
        replies = []
        for message in messages:
            self.asked.append((message, temperature))
            if self.junk(message, temperature):
                replies.append(" I like all of them.")
            elif "[Answer]" in message:  # pointwise
                answer = message.split("[Answer]\n", 1)[1].split("\n\nRate", 1)[0]
                reply = f"Score: {min(10, 1 + answer.count(self.keyword))}"
                replies.append(reply.removeprefix(reply_prefix))
            else:
                shown = re.findall(r"^\[(\d+)\] (.*)$", message, flags=re.M)
                # Stable: among equals the earlier shown wins, so a position bias is there to cancel.
                ranked = sorted(shown, key=lambda item: -item[1].count(self.keyword))
                reply = "Ranking: " + " > ".join(f"[{label}]" for label, _ in ranked)
                replies.append(reply.removeprefix(reply_prefix))
        return replies


def judge(mode="pointwise", engine=None, **options):
    return LlmJudge(mode=mode, engine=engine or KeywordEngine(), **options)


# --- parsers --------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    ("Score: 7", 7.0), ("Score:10", 10.0), ("score = 3", 3.0), ("Score: 7.5/10 because", 7.5),
    ("Score: 1", 1.0), ("Score: 2\nScore: 9", 2.0),
    ("Score: 11", None), ("Score: 0", None), ("Score: 99.9999", None), ("Score: -3", None),
    ("I would give it a 7", None), ("", None), ("Score: seven", None),
])
def test_parse_score(reply, expected):
    assert parse_score(reply, DEFAULT_SCORE_PATTERN, 1, 10) == expected


@pytest.mark.parametrize("reply, count, expected", [
    ("[3] > [1] > [2]", 3, [2, 0, 1]),
    ("Ranking: [2], [3], [1]", 3, [1, 2, 0]),
    ("[ 2 ]>[1]>[3]", 3, [1, 0, 2]),
    ("[2] > [1]", 3, [1, 0, 2]),                              # one left out: it is last
    ("[2]", 2, [1, 0]),
    ("[1] is good. Ranking: [3] > [1] > [2]", 3, [2, 0, 1]),  # the longest chain is the ranking
    ("[3] > [1] > [2]. [1] is the clearest.", 3, [2, 0, 1]),
    ("[2]", 3, None),                                         # two left out
    ("[1] > [2] > [1]", 3, None),                             # a repeated label contradicts itself
    ("[4] > [1] > [2]", 3, None),                             # no answer [4]
    ("[0] > [1] > [2]", 3, None),
    ("they are all fine", 3, None), ("", 2, None), ("1 > 2 > 3", 3, None),
])
def test_parse_order(reply, count, expected):
    assert parse_order(reply, count) == expected


def test_order_scores_map_shown_positions_back_to_answers():
    # Shown: position 0 holds answer 2, position 1 answer 0, position 2 answer 1.
    shown = [2, 0, 1]
    # The judge ranks position 1 first, then 2, then 0.
    assert order_scores([1, 2, 0], shown) == [2.0, 1.0, 0.0]
    assert shuffled(5, "0/p/0") == shuffled(5, "0/p/0")
    assert sorted(shuffled(5, "0/p/1")) == list(range(5))
    assert len({tuple(shuffled(5, f"{seed}/p/0")) for seed in range(20)}) > 1


def test_prompt_and_answers_text():
    assert prompt_text(PROMPT) == "Tell me about tea."
    assert prompt_text([{"role": "system", "content": "Be brief."}, *PROMPT]) == \
        "System: Be brief.\n\nUser: Tell me about tea."
    assert answers_text(["a", "b {x}"]) == "[1] a\n\n[2] b {x}"


# --- the judge with a fake engine -------------------------------------------------

ANSWERS = ["water", "tea tea tea", "tea", "tea tea"]


def test_listwise_order_does_not_depend_on_the_shuffle_or_the_candidates_order():
    finals, shown = set(), set()
    for seed in range(8):
        engine = KeywordEngine()
        for answers in (ANSWERS, ANSWERS[::-1]):
            scores = dict(zip(answers, judge("listwise", engine, seed=seed).score(samples(answers))))
            finals.add(tuple(scores[a] for a in ANSWERS))
        shown.add(tuple(re.findall(r"^\[\d\] (.*)$", engine.asked[0][0], flags=re.M)))
        # The shown order depends on the seed only, not on the order the candidates came in.
        assert engine.asked[0][0] == engine.asked[1][0]
    assert finals == {(0.0, 3.0, 1.0, 2.0)}
    assert len(shown) > 1  # the judge did see different orders


def test_listwise_scores_each_prompt_in_one_call_and_identical_answers_tie():
    engine = KeywordEngine()
    reward = judge("listwise", engine)
    batch = samples(["tea", "water", "tea"], "p") + samples(["no", "tea!"], "q") + samples(["alone"], "r")
    assert reward.score(batch) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    # p shows its 2 distinct answers, q its 2, r is not asked (a tie with itself).
    assert len(engine.asked) == 2 and reward.counters()["judge_calls"] == 2
    assert "Below are 2 answers" in engine.asked[0][0]


def test_pointwise_scores_each_distinct_answer_on_the_scale():
    engine = KeywordEngine()
    reward = judge("pointwise", engine)
    assert reward.score(samples(["water", "tea tea", "water"]) + samples(["water"], "q")) == [1.0, 3.0, 1.0, 1.0]
    assert reward.counters() == {"judge_calls": 3, "judge_unparsed": 0, "judge_too_long": 0}
    assert all(temperature == 0.0 for _, temperature in engine.asked)


def test_unparseable_judgements_are_retried_then_scored_nan_and_counted():
    engine = KeywordEngine(junk=lambda message, temperature: "junk" in message)
    reward = judge("pointwise", engine, retries=2, temperature=0.0, retry_temperature=0.8)
    scores = reward.score(samples(["tea", "junk"]))
    assert scores[0] == 2.0 and math.isnan(scores[1])  # NaN, never a made-up 0
    assert reward.counters() == {"judge_calls": 4, "judge_unparsed": 1, "judge_too_long": 0}
    asked_junk = [temperature for message, temperature in engine.asked if "junk" in message]
    assert asked_junk == [0.0, 0.8, 0.8]
    assert reward.unparsed == 1


def test_a_retry_that_parses_counts_no_failure_and_a_listwise_retry_is_reshuffled():
    engine = KeywordEngine(junk=lambda message, temperature: temperature == 0.0)
    reward = judge("listwise", engine, retries=1)
    assert reward.score(samples(ANSWERS)) == [0.0, 3.0, 1.0, 2.0]
    assert reward.counters() == {"judge_calls": 2, "judge_unparsed": 0, "judge_too_long": 0}
    assert engine.asked[0][0] != engine.asked[1][0]
    never = judge("listwise", KeywordEngine(junk=lambda m, t: True), retries=0)
    assert all(math.isnan(s) for s in never.score(samples(ANSWERS)))
    assert never.counters()["judge_unparsed"] == 1 and never.counters()["judge_calls"] == 1


def test_a_judgement_that_does_not_fit_is_nan_counted_and_not_retried():
    class TooLong(KeywordEngine):
        def complete(self, messages, reply_prefix, stop, temperature):
            replies = super().complete(messages, reply_prefix, stop, temperature)
            return [None if "long" in m else r for m, r in zip(messages, replies)]

    reward = judge("pointwise", TooLong(), retries=2)
    scores = reward.score(samples(["tea", "long long"]))
    assert scores[0] == 2.0 and math.isnan(scores[1])
    assert reward.counters() == {"judge_calls": 1, "judge_unparsed": 0, "judge_too_long": 1}


# --- templates ------------------------------------------------------------------

def test_the_default_templates_load_and_render():
    point = load_template("", "pointwise")
    assert point.path == default_template("pointwise") and point.reply_prefix == "Score:" and point.stop == ("\n",)
    assert (point.min_score, point.max_score) == (1.0, 10.0)
    text = point.render(prompt="Q {not a field}", answer="A }{")
    assert "Q {not a field}" in text and "A }{" in text
    listwise = load_template("", "listwise")
    assert listwise.reply_prefix == "Ranking: ["
    assert "Below are 3 answers" in listwise.render(prompt="Q", answers=answers_text("abc"), count=3)


TEMPLATE_PROBLEMS = [
    ("---\nmode: pointwise\n---\nGrade {answer}.", "pointwise", "lacks the placeholder {prompt}"),
    ("{prompt} {answer}", "listwise", "lacks the placeholder {answers}"),
    ("{prompt} {answer} {score}", "pointwise", "names unknown placeholders 'score'"),
    ("{prompt} {answer} {", "pointwise", "is not a valid str.format template"),
    ("---\nmode: listwise\n---\n{prompt} {answer}", "pointwise", "is written for mode 'listwise'"),
    ("---\nscale: 5\n---\n{prompt} {answer}", "pointwise", "front-matter keys that pointwise does not read: scale"),
    ("---\npattern: 'Score: \\d'\n---\n{prompt} {answer}", "pointwise", "needs exactly one, around the score"),
    ("---\npattern: '(['\n---\n{prompt} {answer}", "pointwise", "not a regular expression"),
    ("---\nmin_score: 5\nmax_score: 5\n---\n{prompt} {answer}", "pointwise", "min_score < max_score"),
    ("---\nstop: [1]\n---\n{prompt} {answers}", "listwise", "stop a list of non-empty strings"),
    ("---\nmode: [\n---\n{prompt} {answers}", "listwise", "not valid YAML"),
    ("---\nmode: listwise\n{prompt} {answers}", "listwise", "never closes it"),
]


@pytest.mark.parametrize("text, mode, problem", TEMPLATE_PROBLEMS)
def test_a_bad_template_is_refused_in_one_line_naming_the_file(tmp_path, text, mode, problem):
    path = tmp_path / "judge.txt"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_template(str(path), mode)
    message = str(caught.value)
    assert problem in message and str(path) in message and "\n" not in message


def test_a_template_without_front_matter_uses_the_defaults(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("Request: {prompt}\nAnswer: {answer}\nScore from 1 to 10.\n")
    template = load_template(str(path), "pointwise")
    assert (template.reply_prefix, template.stop, template.pattern) == ("", (), DEFAULT_SCORE_PATTERN)
    assert template.body.endswith("Score from 1 to 10.")


# --- config ---------------------------------------------------------------------

def test_config_keys_are_read_checked_and_refused_elsewhere(tmp_path):
    from pipeline.settings import load_config

    template = tmp_path / "mine.txt"
    template.write_text("{prompt}\n\n{answers}")
    config = load_config(None, ["reward.name=llm_judge", f"reward.judge.model={JUDGE}", "reward.judge.mode=listwise",
                                f"reward.judge.template={template}", "reward.judge.retries=0",
                                "reward.judge.max_tokens=8"])
    assert (config.reward.judge.mode, config.reward.judge.retries, config.reward.judge.max_tokens) == (
        "listwise", 0, 8)
    assert config.reward.judge.template == str(template)
    built = build_reward_from_config(config.reward)
    assert isinstance(built, LlmJudge) and built._engine is None  # no engine until the first score
    assert REWARDS["llm_judge"] is LlmJudge
    with pytest.raises(ConfigError, match="'reward.judge.model' must name the judge model"):
        load_config(None, ["reward.name=llm_judge"])
    with pytest.raises(ConfigError, match="'reward.judge.retries' has no effect with reward.name=ifeval"):
        load_config(None, ["reward.judge.retries=1"])
    with pytest.raises(ConfigError, match=f"template file {tmp_path / 'gone.txt'} does not exist"):
        load_config(None, ["reward.name=llm_judge", f"reward.judge.model={JUDGE}",
                           f"reward.judge.template={tmp_path / 'gone.txt'}"])
    with pytest.raises(ConfigError, match=f"template file {template} lacks the placeholder {{answer}}"):
        load_config(None, ["reward.name=llm_judge", f"reward.judge.model={JUDGE}", f"reward.judge.template={template}"])
    with pytest.raises(ConfigError, match="'reward.judge.retry_temperature' must be above 0"):
        load_config(None, ["reward.name=llm_judge", f"reward.judge.model={JUDGE}", "reward.judge.retry_temperature=0"])
    # Listwise scores compare one call's answers; pointwise ones may be pooled across rounds.
    with pytest.raises(ConfigError, match="'lists.memory' must be none with reward.name=llm_judge"):
        load_config(None, ["reward.name=llm_judge", f"reward.judge.model={JUDGE}", "reward.judge.mode=listwise",
                           "lists.memory=previous"])
    load_config(None, ["reward.name=llm_judge", f"reward.judge.model={JUDGE}", "lists.memory=previous"])


def test_only_listwise_needs_whole_prompts_alone_or_in_a_composite():
    assert not needs_whole_prompts({"name": "llm_judge", "judge": {"mode": "pointwise"}})
    assert needs_whole_prompts({"name": "llm_judge", "judge": {"mode": "listwise"}})
    assert needs_whole_prompts({"name": "composite", "judge": {"mode": "listwise"},
                                "composite": {"components": {"ifeval": 1.0, "llm_judge": 0.5}}})
    assert not needs_whole_prompts({"name": "composite", "judge": {"mode": "pointwise"},
                                    "composite": {"components": {"ifeval": 1.0, "llm_judge": 0.5}}})


def test_a_composite_component_named_llm_judge_scores_and_counts():
    from pipeline.settings import load_config

    config = load_config(None, ["reward.name=composite", "reward.composite.components=llm_judge:0.5",
                                "reward.composite.length_penalty=1.0", f"reward.judge.model={JUDGE}"])
    composite = build_reward_from_config(config.reward)
    (weight, part), = composite.parts
    assert isinstance(part, LlmJudge) and weight == 0.5
    part._engine = KeywordEngine()
    assert composite.score(samples(["tea tea", "water"])) == pytest.approx([0.5 * 3.0 - 0.02, 0.5 * 1.0 - 0.01])
    # As RewardWorker.counts sums them for the stage: a composite's components' counters too.
    from pools.reward_scorers import RewardWorker

    worker = type("Worker", (), {"reward": composite})()
    counts = RewardWorker.__ray_metadata__.modified_class.counts(worker)
    assert counts == {"comparisons": 0, "judge_calls": 2, "judge_unparsed": 0, "judge_too_long": 0}


def test_the_rerank_stage_and_inspect_report_the_judge_counters(tmp_path, monkeypatch, capsys):
    import yaml

    from core.layout import atomic_write_text
    from pipeline.cli import main as cli_main
    from stages import rerank
    from tests.test_rerank_stage import generate, make_plan

    plan = make_plan(tmp_path, 1, "reward.on_invalid=drop")
    generate(plan, {"p": ["a", "b", "c"], "q": ["d", "e"]})

    def fake_score(rows, reward_config, retries=None, num_gpus=0.0, tally=None):
        tally.update({"comparisons": 0, "judge_calls": 6, "judge_unparsed": 1, "judge_too_long": 0})
        return [float("nan") if row["response"] == "e" else float(ord(row["response"])) for row in rows]

    monkeypatch.setattr(rerank, "score_candidates", fake_score)
    stats = rerank.run_stage(plan, plan.round.begin_stage("rerank"))
    plan.round.finish_stage("rerank", stats)
    assert (stats["judge_calls"], stats["judge_unparsed"], stats["judge_too_long"]) == (6, 1, 0)
    assert "reward_comparisons" not in stats and stats["invalid_rewards_dropped"] == 1
    atomic_write_text(plan.round.config, yaml.safe_dump(plan.config.to_dict(), sort_keys=False))
    assert cli_main(["inspect", str(plan.round.dir)]) == 0
    assert "judge            6 calls; 1 judgements unparseable after retries, 0 too long" in capsys.readouterr().out


# --- a real round ---------------------------------------------------------------

@pytest.mark.e2e
def test_a_smoke_round_judged_by_smollm2(tmp_path, tiny_model):
    from tests.conftest import run_cli

    output = tmp_path / "runs"
    result = run_cli("round", "1", "--config", "configs/smoke.yaml", "--run", "judge", "--output", str(output),
                     "reward.name=llm_judge", f"reward.judge.model={JUDGE}", "reward.on_invalid=drop",
                     "prompts.eval_size=0", timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    round_dir = output / "judge" / "round_001"
    stats = json.loads((round_dir / "_done" / "rerank").read_text())
    assert (round_dir / "lists").is_dir() and stats["candidates"] == stats["prompts"] * 4
    # Each distinct answer judged at least once, at most 1 + retries times; none left out as too long.
    distinct = stats["judge_calls"] - stats["judge_too_long"]
    assert 0 < distinct <= stats["candidates"] * 3 and stats["judge_too_long"] == 0
    # Unparseable judgements are NaN, dropped by reward.on_invalid (each holds one or more candidates).
    assert stats["judge_unparsed"] <= stats["invalid_rewards_dropped"]
    assert (stats["judge_unparsed"] == 0) == (stats["invalid_rewards_dropped"] == 0)
    assert "judge_calls" in (output / "judge" / "logs" / "round_001" / "rerank.log").read_text()
    shown = run_cli("inspect", str(round_dir), "--examples", "1", timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert (f"judge            {stats['judge_calls']} calls; {stats['judge_unparsed']} judgements unparseable "
            f"after retries, {stats['judge_too_long']} too long") in shown.stdout
