"""Tests of the task layer: reasoning-gym tasks, verl-style files and build_task."""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings

os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="vespo-mpl-"))  # reasoning-gym imports matplotlib

import pytest

from vespo.tasks import (
    DataFileError,
    Example,
    ReasoningGymTask,
    RewardFnTask,
    VerlFileTask,
    build_task,
    check_disjoint,
    example_to_verl_row,
    read_verl_file,
    write_verl_jsonl,
    write_verl_parquet,
)
from vespo.tasks.arithmetic import render_solution, worked_steps

CHAIN = {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 2}
BASIC = {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 2}
PRODUCTS = {"min_digits": 1, "max_digits": 2}
ARITH = [("chain_sum", CHAIN), ("basic_arithmetic", BASIC), ("products", PRODUCTS)]


@pytest.fixture(scope="module")
def chain_task() -> ReasoningGymTask:
    return ReasoningGymTask("chain_sum", CHAIN)


# --------------------------------------------------------------------------- worked solutions


@pytest.mark.parametrize(
    "expression, answer, expected",
    [
        ("12 + 7 + 30", "49", "12+7=19,19+30=49. Answer: 49"),
        ("( 56 + -33 ) - 84", "-61", "56+-33=23,23-84=-61. Answer: -61"),
        ("2 - -1", "3", "2--1=3. Answer: 3"),
        ("2 + 3 * 4", "14", "3*4=12,2+12=14. Answer: 14"),
        # reasoning-gym's parenthesis-free basic_arithmetic evaluates left to right
        ("2 + 3 * 4", "20", "2+3=5,5*4=20. Answer: 20"),
        ("-( 3 + 4 ) * 2", "-14", "3+4=7,-(7)=-7,-7*2=-14. Answer: -14"),
        ("84 / 4 - 1", "20", "84/4=21,21-1=20. Answer: 20"),
    ],
)
def test_worked_steps(expression: str, answer: str, expected: str) -> None:
    steps = worked_steps(expression, answer)
    assert steps is not None
    assert render_solution(steps, answer) == expected


def test_worked_steps_long_multiplication_and_mismatch() -> None:
    steps = worked_steps("12 * 34", "408", expand_products=True)
    assert render_solution(steps, "408") == "12*30=360,12*4=48,360+48=408. Answer: 408"
    assert render_solution(steps, "408", spaced=True).splitlines()[-1] == "Answer: 408"
    assert worked_steps("12 * 34", "409") is None  # never a wrong derivation
    assert worked_steps("12 * x", "1") is None


# --------------------------------------------------------------------------- reasoning-gym


@pytest.mark.parametrize("name, params", ARITH)
@pytest.mark.parametrize("style", ["plain", "instruct"])
def test_arithmetic_demonstrations_score_one(name: str, params: dict, style: str) -> None:
    task = ReasoningGymTask(name, params, prompt_style=style)
    examples = task.train_examples(200, seed=0)
    assert len(examples) == 200
    for ex in examples:
        demo = task.demonstration(ex)
        assert demo is not None, ex
        assert task.score(demo, ex) == 1.0, (ex.prompt, demo)
        assert demo.rstrip().endswith(f"Answer: {ex.ground_truth}")
        if name != "products":
            assert len(re.findall(r"=", demo)) >= 1  # worked steps, not a bare answer
        if style == "plain":
            assert isinstance(ex.prompt, str) and re.fullmatch(r"[-+*/()0-9]+=", ex.prompt), ex.prompt
            assert "\n" not in demo
        else:
            assert isinstance(ex.prompt, list) and ex.prompt[0]["role"] == "user"
            assert "Answer: <answer>" in ex.prompt[0]["content"]


def test_plain_chain_sum_lengths(chain_task: ReasoningGymTask) -> None:
    examples = chain_task.train_examples(300, seed=1)
    lengths = [len(chain_task.demonstration(ex)) for ex in examples]
    assert min(lengths) >= 15 and max(lengths) <= 80
    assert max(len(ex.prompt) for ex in examples) <= 16


@pytest.mark.parametrize("name, params", ARITH + [("gsm_symbolic", {})])
def test_wrong_answers_score_zero(name: str, params: dict) -> None:
    task = ReasoningGymTask(name, params)
    for ex in task.train_examples(30, seed=2):
        wrong = str(int(float(ex.ground_truth)) + 1)
        assert task.score(f"1+1=2. Answer: {wrong}", ex) == 0.0
        assert task.score(ex.ground_truth, ex) == 0.0  # no "Answer:" marker
        assert task.score("", ex) == 0.0
        assert task.score(f"Answer: {ex.ground_truth}", ex) == 1.0


def test_binary_vs_partial_credit() -> None:
    binary = ReasoningGymTask("chain_sum", CHAIN)
    partial = ReasoningGymTask("chain_sum", CHAIN, partial_credit=True)
    ex = next(e for e in binary.train_examples(50, seed=0) if len(e.ground_truth) >= 2)
    response = f"Answer: {ex.ground_truth}9"  # contains the gold string: reasoning-gym gives partial credit
    assert binary.score(response, ex) == 0.0
    assert 0.0 < partial.score(response, ex) < 1.0


@pytest.mark.parametrize(
    "template",
    [
        "x. Answer: {a}",
        "x. Answer: {a}.",
        "**Answer:** {a}",
        "Final answer: {a}",
        "Answer:\n{a}\n",
        "Answer: $\\boxed{{{a}}}$",
    ],
)
def test_answer_extraction_variants(chain_task: ReasoningGymTask, template: str) -> None:
    ex = chain_task.train_examples(1, seed=0)[0]
    assert chain_task.score(template.format(a=ex.ground_truth), ex) == 1.0


@pytest.mark.parametrize("name, params", ARITH + [("gsm_symbolic", {})])
def test_train_eval_disjoint(name: str, params: dict) -> None:
    task = ReasoningGymTask(name, params)
    for seed in (0, 1):
        train = task.train_examples(1500, seed=seed)
        for eval_seed in (0, 1):
            evals = task.eval_examples(100, seed=eval_seed)
            assert evals and {ex.metadata["split"] for ex in evals} == {"eval"}
            check_disjoint(train, evals)
            keys = [ex.prompt for ex in evals]
            assert len(set(keys)) == len(keys)  # eval questions are unique


def test_determinism_by_seed(chain_task: ReasoningGymTask) -> None:
    a = chain_task.train_examples(100, seed=3)
    assert a == chain_task.train_examples(100, seed=3)
    assert a[:40] == chain_task.train_examples(40, seed=3)  # prefix-stable
    assert [e.prompt for e in a] != [e.prompt for e in chain_task.train_examples(100, seed=4)]
    assert chain_task.eval_examples(30, seed=0) == chain_task.eval_examples(30, seed=0)
    rebuilt = ReasoningGymTask("chain_sum", CHAIN)
    assert rebuilt.train_examples(100, seed=3) == a
    assert len({e.uid for e in a}) == len(a)


def test_small_question_space_eval_warns() -> None:
    task = ReasoningGymTask("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    with pytest.warns(UserWarning, match="unique eval questions"):
        evals = task.eval_examples(500, seed=0)
    assert 0 < len(evals) < 100
    check_disjoint(task.train_examples(3000, seed=0), evals)


@pytest.mark.parametrize("style", ["plain", "instruct"])
def test_gsm_symbolic_demonstrations(style: str) -> None:
    task = ReasoningGymTask("gsm_symbolic", {}, prompt_style=style)
    examples = task.train_examples(5, seed=0)
    for ex in examples:
        demo = task.demonstration(ex)
        assert demo is not None and len(demo) > 40
        assert "####" not in demo
        assert task.score(demo, ex) == 1.0
        assert task.score("Answer: -12345", ex) == 0.0
    if style == "plain":  # items whose gold the dataset's scorer cannot read are filtered out
        assert all(task.demonstration(ex) is not None for ex in task.train_examples(3000, seed=0))


def test_other_dataset_bare_demonstration() -> None:
    task = ReasoningGymTask("simple_equations", {})
    ex = task.train_examples(3, seed=0)[0]
    assert ex.prompt.endswith("\n")
    assert task.demonstration(ex) == f"Answer: {ex.ground_truth}"


def test_multiline_answers() -> None:
    task = ReasoningGymTask("rotate_matrix", {})
    ex = task.train_examples(2, seed=0)[0]
    assert "\n" in ex.ground_truth
    demo = task.demonstration(ex)
    assert demo == f"Answer:\n{ex.ground_truth}" and task.score(demo, ex) == 1.0
    assert task.score("Answer: 1 2\n3 4", ex) == 0.0


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="chain_sum") as info:
        ReasoningGymTask("chain_summ", {})
    assert "Did you mean" in str(info.value) and "basic_arithmetic" in str(info.value)
    with pytest.raises(ValueError, match="max_terms"):  # names the valid params
        ReasoningGymTask("chain_sum", {"num_terms": 3})
    with pytest.raises(ValueError, match="invalid params"):
        ReasoningGymTask("chain_sum", {"min_terms": 0})
    with pytest.raises(ValueError, match="seed"):
        ReasoningGymTask("chain_sum", {"seed": 1})
    with pytest.raises(ValueError, match="plain, instruct"):
        ReasoningGymTask("chain_sum", {}, prompt_style="chat")
    with pytest.raises(ValueError):
        ReasoningGymTask("chain_sum", {}, eval_fraction=1.5)


# --------------------------------------------------------------------------- verl files

SUFFIX = " Please reason step by step, and put your final answer within \\boxed{}."


def _row(question: str, answer: str, source: str = "math_dapo", index: int = 0) -> dict:
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": question + SUFFIX}],
        "ability": "math",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": index, "split": "train"},
    }


TRAIN_ROWS = [
    _row("What is 1/2 as a fraction?", "\\frac{1}{2}", index=0),
    _row("Compute sqrt(8).", "2\\sqrt{2}", index=1),
    _row("What is 30+4?", "34", index=2),
    _row("What is 3/4?", "$\\frac{3}{4}$", index=3),
]
EVAL_ROWS = [_row("AIME-like: 6*7?", "42", "aime24"), _row("Half of 1?", "\\frac{1}{2}", "math500")]


def _write(path, rows):
    return write_verl_parquet(path, rows) if str(path).endswith(".parquet") else write_verl_jsonl(path, rows)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_verl_round_trip_and_math_verify(tmp_path, ext: str) -> None:
    train = _write(tmp_path / f"train.{ext}", TRAIN_ROWS)
    evalf = _write(tmp_path / f"eval.{ext}", EVAL_ROWS)
    task = VerlFileTask(train, evalf)
    assert (task.num_train, task.num_eval) == (4, 2)
    rows = read_verl_file(train)
    assert [r.prompt for r in rows] == [r["prompt"] for r in TRAIN_ROWS]
    assert [r.ground_truth for r in rows] == [r["reward_model"]["ground_truth"] for r in TRAIN_ROWS]
    assert rows[0].data_source == "math_dapo" and rows[0].metadata["extra_info"]["index"] == 0
    assert rows[2].uid == f"train.{ext}:2"

    half, root, plain, quarter = rows
    assert task.score("So the answer is \\boxed{\\frac{1}{2}}.", half) == 1.0
    assert task.score("so \\boxed{0.5}", half) == 1.0
    assert task.score("\\boxed{1} then \\boxed{0.5}", half) == 1.0  # the last box counts
    assert task.score("\\boxed{0.5} then \\boxed{1}", half) == 0.0
    assert task.score("\\boxed{\\frac{1}{3}}", half) == 0.0
    assert task.score("\\boxed{\\frac{1}{2}", half) == 0.0  # unclosed
    assert task.score("0.5", half) == 0.0  # no box
    assert task.score("\\boxed{2\\sqrt{2}}", root) == 1.0
    assert task.score("\\boxed{\\sqrt{8}}", root) == 1.0
    assert task.score("\\boxed{2}", root) == 0.0
    assert task.score("\\boxed{34}", plain) == 1.0
    assert task.score("\\boxed{0.75}", quarter) == 1.0
    for ex in rows + task.eval_examples(10):
        assert task.score(task.demonstration(ex), ex) == 1.0
    assert [e.data_source for e in task.eval_examples(10)] == ["aime24", "math500"]


def test_verl_split_and_sampling(tmp_path) -> None:
    rows = [_row(f"Question {i}?", str(i), index=i) for i in range(200)]
    path = write_verl_jsonl(tmp_path / "all.jsonl", rows)
    task = VerlFileTask(path, eval_fraction=0.2)
    assert task.num_train + task.num_eval == 200 and 15 < task.num_eval < 65
    train_all = task.train_examples(task.num_train, seed=0)
    evals = task.eval_examples(1000)
    check_disjoint(train_all, evals)
    assert {e.uid for e in train_all} | {e.uid for e in evals} == {f"all.jsonl:{i}" for i in range(200)}
    # same split when rebuilt; seeded order; cycling beyond one pass
    again = VerlFileTask(path, eval_fraction=0.2)
    assert [e.uid for e in again.eval_examples(1000)] == [e.uid for e in evals]
    assert task.train_examples(50, seed=1) == task.train_examples(50, seed=1)
    assert task.train_examples(50, seed=1) != task.train_examples(50, seed=2)
    long = task.train_examples(task.num_train * 2 + 3, seed=0)
    assert len(long) == task.num_train * 2 + 3
    assert len({e.uid for e in long[: task.num_train]}) == task.num_train
    assert len(task.eval_examples(5, seed=0)) == 5


def test_verl_overlap_check(tmp_path) -> None:
    train = write_verl_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    evalf = write_verl_jsonl(tmp_path / "eval.jsonl", TRAIN_ROWS[:1] + EVAL_ROWS)
    with pytest.warns(UserWarning, match="1 of 3 eval prompts"):
        VerlFileTask(train, evalf)
    with pytest.raises(DataFileError, match="also occur"):
        VerlFileTask(train, evalf, overlap="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VerlFileTask(train, evalf, overlap="ignore")


def _bad_jsonl(tmp_path, bad_line: str, position: int = 2):
    lines = [json.dumps(r) for r in TRAIN_ROWS]
    lines.insert(position, bad_line)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({k: v for k, v in TRAIN_ROWS[0].items() if k != "reward_model"}, "missing 'reward_model'"),
        ({**TRAIN_ROWS[0], "reward_model": {"style": "rule"}}, "no 'ground_truth'"),
        ({**TRAIN_ROWS[0], "reward_model": {"ground_truth": ["1", "2"]}}, "string or number"),
        ({**TRAIN_ROWS[0], "prompt": 5}, "list of chat messages"),
        ({**TRAIN_ROWS[0], "prompt": [{"content": "hi"}]}, "string 'role' and 'content'"),
        ({**TRAIN_ROWS[0], "data_source": None}, "data_source"),
        ({**TRAIN_ROWS[0], "extra_info": "x"}, "extra_info"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": ', "invalid JSON"),
    ],
)
def test_malformed_jsonl_rows(tmp_path, bad, problem: str) -> None:
    path = _bad_jsonl(tmp_path, bad if isinstance(bad, str) else json.dumps(bad))
    with pytest.raises(DataFileError) as info:
        read_verl_file(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.row, err.line) == (2, 3)
    message = str(err)
    assert "\n" not in message and "bad.jsonl" in message and "line 3" in message and problem in message


def test_malformed_files(tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataFileError, match="empty.jsonl: file has no rows"):
        read_verl_file(empty)
    with pytest.raises(DataFileError, match="unknown extension '.csv'"):
        read_verl_file(tmp_path / "data.csv")
    with pytest.raises(DataFileError, match="does not exist"):
        VerlFileTask(tmp_path / "nope.parquet")

    pytest.importorskip("pyarrow")
    no_prompt = [{k: v for k, v in r.items() if k != "prompt"} for r in TRAIN_ROWS]
    no_col = write_verl_parquet(tmp_path / "nocol.parquet", no_prompt)
    with pytest.raises(DataFileError, match=r"nocol.parquet: missing column\(s\) prompt"):
        read_verl_file(no_col)
    null_gt = [dict(r) for r in TRAIN_ROWS]
    null_gt[1] = {**null_gt[1], "reward_model": {"ground_truth": None, "style": "rule"}}
    path = write_verl_parquet(tmp_path / "nullgt.parquet", null_gt)
    with pytest.raises(DataFileError, match="nullgt.parquet, row 1: 'reward_model' has no 'ground_truth'") as info:
        read_verl_file(path)
    assert info.value.row == 1
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(DataFileError, match="garbage.parquet: cannot read parquet"):
        read_verl_file(garbage)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_reasoning_gym_to_verl(tmp_path, ext: str, chain_task: ReasoningGymTask) -> None:
    examples = chain_task.train_examples(20, seed=0)
    rows = [
        example_to_verl_row(
            ex, index=i, split="train", prompt_suffix=SUFFIX, demonstration=f"\\boxed{{{ex.ground_truth}}}"
        )
        for i, ex in enumerate(examples)
    ]
    path = _write(tmp_path / f"rg.{ext}", rows)
    task = VerlFileTask(path, _write(tmp_path / f"rg_eval.{ext}", chain_task.eval_examples(5)))
    loaded = read_verl_file(path)
    assert [ex.ground_truth for ex in loaded] == [ex.ground_truth for ex in examples]
    assert loaded[0].prompt == [{"role": "user", "content": examples[0].prompt + SUFFIX}]
    assert loaded[0].data_source == "reasoning_gym/chain_sum"
    for ex in loaded:
        assert task.score(task.demonstration(ex), ex) == 1.0


# --------------------------------------------------------------------------- build_task


def test_build_task_kinds(tmp_path) -> None:
    rg = build_task({"kind": "reasoning_gym", "name": "chain_sum", "params": CHAIN, "prompt_style": "plain"})
    assert isinstance(rg, ReasoningGymTask) and rg.params == CHAIN
    assert build_task(rg.spec).train_examples(10, 0) == rg.train_examples(10, 0)

    train = write_verl_jsonl(tmp_path / "t.jsonl", TRAIN_ROWS)
    evalf = write_verl_parquet(tmp_path / "e.parquet", EVAL_ROWS)
    vf = build_task({"kind": "verl_file", "train_path": str(train), "eval_path": str(evalf)})
    assert isinstance(vf, VerlFileTask) and vf.num_eval == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 4 rows: the 10% hold-out may be empty
        vf2 = build_task({"kind": "verl_file", "train_path": str(train), "eval_path": None})
        with_callable = build_task({"kind": "verl_file", "train_path": str(train), "reward_fn": lambda r, e: 0.25})
    assert vf2.num_train + vf2.num_eval == 4

    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text("def longer(response, example):\n    return float(len(response) > 3)\n")
    custom = build_task({"kind": "reasoning_gym", "name": "chain_sum", "reward_fn": f"{reward_file}:longer"})
    assert isinstance(custom, RewardFnTask)
    ex = custom.train_examples(1, 0)[0]
    assert custom.score("abcd", ex) == 1.0 and custom.score("ab", ex) == 0.0
    assert custom.demonstration(ex) is not None and custom.eval_examples(3, 0)
    assert with_callable.score("x", ex) == 0.25


def test_build_task_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="reasoning_gym, verl_file"):
        build_task({"kind": "gsm8k"})
    with pytest.raises(ValueError, match="needs name"):
        build_task({"kind": "reasoning_gym"})
    with pytest.raises(ValueError, match="does not take train_path"):
        build_task({"kind": "reasoning_gym", "name": "chain_sum", "train_path": "x.jsonl"})
    with pytest.raises(ValueError, match="needs train_path"):
        build_task({"kind": "verl_file"})
    with pytest.raises(ValueError, match="no module named"):
        build_task({"kind": "reasoning_gym", "name": "chain_sum", "reward_fn": "no_such_module_xyz:fn"})
    with pytest.raises(DataFileError):
        build_task({"kind": "verl_file", "train_path": str(tmp_path / "missing.jsonl")})


def test_build_task_from_trainer_config() -> None:
    config = pytest.importorskip("vespo.train.config")
    spec = config.TaskConfig(name="basic_arithmetic", params={"max_terms": 3, "max_digits": 2}).spec()
    task = build_task(spec)
    ex = task.train_examples(2, 0)[0]
    assert task.score(task.demonstration(ex), ex) == 1.0


def test_example_helpers() -> None:
    ex = Example(prompt="1+2=", ground_truth="3", data_source="d")
    assert ex.messages() == [{"role": "user", "content": "1+2="}] and ex.metadata == {} and ex.uid == ""
    chat = Example(prompt=[{"role": "user", "content": "hi"}], ground_truth="3", data_source="d")
    assert chat.prompt_text() == "user: hi"


# --------------------------------------------------------------------------- code tasks

CODE_PARAMS = {"num_tests": 6, "sandbox": {"case_timeout_s": 1.0, "memory_mb": 64}, "sandbox_workers": 1}


@pytest.fixture(scope="module")
def code_task():
    return build_task({"kind": "reasoning_gym", "name": "code_functions", "params": CODE_PARAMS})


def test_code_task_by_name_split_and_determinism(code_task) -> None:
    from vespo.tasks import TEMPLATE_KEYS, CodeTask

    assert isinstance(code_task, CodeTask) and code_task.score_in_process
    assert isinstance(build_task({"kind": "code", "params": CODE_PARAMS}), CodeTask)
    train, eval_ = code_task.train_examples(60, 0), code_task.eval_examples(30, 0)
    assert train == code_task.train_examples(60, 0) and train != code_task.train_examples(60, 1)
    problem = lambda ex: ex.prompt[0]["content"].split("\n\nFor example:")[0]  # noqa: E731
    assert not {problem(e) for e in eval_} & {problem(e) for e in train}
    assert len({problem(e) for e in eval_}) == len(eval_) == 30
    assert len({e.metadata["template"] for e in train}) >= 10 and set(TEMPLATE_KEYS) >= {
        e.metadata["template"] for e in train
    }
    ex = train[0]
    tests = json.loads(ex.ground_truth)
    assert len(tests["inputs"]) == len(tests["outputs"]) == 6 and tests["fn_name"] == ex.metadata["fn_name"]
    assert "```python" in ex.prompt[0]["content"] and f"`{ex.metadata['fn_name']}(" in ex.prompt[0]["content"]
    with pytest.raises(ValueError, match="no parameter"):
        build_task({"kind": "reasoning_gym", "name": "code_functions", "params": {"min_terms": 2}})
    with pytest.raises(ValueError, match="unknown code template"):
        build_task({"kind": "code", "params": {"templates": ["nope"]}})


def test_code_task_scoring(code_task) -> None:
    from vespo.tasks import RewardRunner

    examples = code_task.eval_examples(12, 0)
    demos = [code_task.demonstration(e) for e in examples]
    assert code_task.score_many(demos, examples) == [1.0] * 12  # every reference solution passes
    ex = examples[0]
    fn = ex.metadata["fn_name"]
    wrong = f"```python\ndef {fn}(*args):\n    return None\n```"
    unfenced = ex.metadata["solution"]
    chatty = f"Here:\n```python\nimport os\n```\nand\n```python\n{ex.metadata['solution']}```\nDone."
    hang = f"```python\ndef {fn}(*args):\n    while True:\n        pass\n```"
    runner = RewardRunner(code_task)
    assert runner.isolation == "inline"  # the sandbox contains the code; no reward worker needed
    scores, stats = runner.score_batch([demos[0], wrong, unfenced, chatty, hang], [ex] * 5)
    assert scores == [1.0, 0.0, 0.0, 1.0, 0.0] and stats["reward/errors"] == 0
    partial = build_task({"kind": "code", "params": {**CODE_PARAMS, "partial_credit": True}})
    first_only = f"```python\nCALLS = []\ndef {fn}(*args):\n    CALLS.append(1)\n"
    first_only += f"    if len(CALLS) > 1:\n        return None\n    return REF(*args)\n{ex.metadata['solution']}```"
    first_only = first_only.replace(f"def {fn}(", "def REF(", 2).replace("def REF(*args)", f"def {fn}(*args)", 1)
    assert partial.score(first_only, ex) == pytest.approx(1 / 6)


def test_extract_code_and_pass_at_k() -> None:
    from vespo.tasks import extract_code, pass_at_k
    from vespo.tasks.code_tasks import pass_at_k_report

    text = "```python\ndef g():\n    pass\n```\n```py\ndef f(x):\n    return x\n```\n```\nprint(1)\n```"
    assert extract_code(text, "f") == "def f(x):\n    return x\n"
    assert extract_code(text) == "print(1)\n" and extract_code("```python\ndef f(): ...") is None
    assert extract_code("```js\nfunction f() {}\n```") is None
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k_report([[True, False], [False, False]], ks=(1, 2, 4)) == {"pass@1": 0.25, "pass@2": 0.5}
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_evaluate_pass_at_k(code_task) -> None:
    from vespo.tasks import evaluate_pass_at_k

    examples = code_task.eval_examples(3, 0)
    good = [code_task.demonstration(e) for e in examples]
    responses = [[good[0]] * 4, [good[1], "no", "no", "no"], ["no"] * 4]
    report = evaluate_pass_at_k(code_task, examples, responses, ks=(1, 4))
    assert report["pass@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert report["pass@4"] == pytest.approx(2 / 3) and report["problems"] == 3


def test_verl_file_with_code_rows(tmp_path) -> None:
    from vespo.tasks import RewardRunner

    rows = [
        {  # Eurus-2-RL-Data / APPS style: stdin/stdout tests as a JSON string
            "data_source": "codecontests",
            "ability": "code",
            "prompt": [{"role": "user", "content": "Read two integers and print their sum."}],
            "reward_model": {
                "style": "rule",
                "ground_truth": json.dumps({"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}),
            },
        },
        {  # call-based (LeetCode style), tests given as an object
            "data_source": "leetcode",
            "prompt": [{"role": "user", "content": "Write twice(x)."}],
            "reward_model": {"ground_truth": {"fn_name": "twice", "inputs": [[1], [4]], "outputs": [2, 8]}},
        },
        {
            "data_source": "math",
            "prompt": [{"role": "user", "content": "1/2?"}],
            "reward_model": {"ground_truth": "\\frac{1}{2}"},
        },
    ]
    path = write_verl_jsonl(tmp_path / "mixed.jsonl", rows)
    task = VerlFileTask(path, path, overlap="ignore", sandbox={"case_timeout_s": 1.0}, sandbox_workers=1)
    stdio, call, math_ex = task.eval_examples(3)
    assert stdio.metadata["ability"] == "code" and task.demonstration(stdio) is None
    good_stdio = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    good_call = "```python\ndef twice(x):\n    return 2 * x\n```"
    assert task.score_many([good_stdio, good_call, "\\boxed{0.5}"], [stdio, call, math_ex]) == [1.0, 1.0, 1.0]
    assert task.score(good_call, stdio) == 0.0 and task.score("\\boxed{3}", math_ex) == 0.0
    with RewardRunner(task, timeout_s=30.0, workers=1) as runner:  # math-verify: in a worker process
        assert runner.isolation == "process"
        scores, stats = runner.score_batch(
            [good_stdio, "```python\nimport os\nos._exit(1)\n```", good_call], [stdio, stdio, call]
        )
    assert scores == [1.0, 0.0, 1.0] and stats["reward/errors"] == 0
    exported = example_to_verl_row(
        build_task({"kind": "code", "params": CODE_PARAMS}).train_examples(1, 0)[0], ability="code"
    )
    assert json.loads(exported["reward_model"]["ground_truth"])["fn_name"]
