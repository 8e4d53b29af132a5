"""python -m megatron_tip.data.prepare dapo on a fixture in DAPO-Math-17k's published layout."""
import json

import pytest

from megatron_tip.data.jsonl import read_problems
from megatron_tip.data.prepare import DAPO_PREFIX, DAPO_SUFFIX, main
from megatron_tip.data.prompts import INSTRUCTION, PromptFormat, build_prompt

PROBLEMS = [  # (problem, answer): LaTeX, a blank line and the word "Answer:" inside the problem
    ("Let $f(x)=x^2+1$. Find $f(3)$.", "10"),
    ("In triangle $ABC$, $AB=3$.\n\nFind the area if the Answer: line is $\\frac{a}{b}$; report $a+b$.", "34"),
    ("How many primes are below $20$?", "8"),
]


def published_rows():
    """Rows exactly as the published parquet holds them (columns and nesting), one repeated."""
    rows = []
    for i, (problem, answer) in enumerate(PROBLEMS + PROBLEMS[:1]):  # the file repeats prompts
        rows.append({"data_source": "math_dapo",
                     "prompt": [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}],
                     "ability": "MATH",
                     "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
                     "extra_info": {"index": f"uuid-{i}"}})
    return rows


def check_output(path):
    rows = read_problems(path)  # the trainer's own reader accepts it
    assert [(r["problem"], r["answer"]) for r in rows] == PROBLEMS  # stripped, deduplicated, in order
    prompt = build_prompt(rows[1]["problem"], fmt=PromptFormat("{problem}\n{instruction}"))
    assert prompt.endswith(INSTRUCTION) and "Remember to put" not in prompt and "Solve the following" not in prompt


def test_dapo_jsonl(tmp_path, capsys):
    src = tmp_path / "dapo.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in published_rows()))
    assert main(["dapo", "--in", str(src), "--out", str(tmp_path / "out.jsonl")]) == 3
    check_output(tmp_path / "out.jsonl")
    assert main(["dapo", "--in", str(src), "--out", str(tmp_path / "all.jsonl"), "--keep-duplicates"]) == 4


def test_dapo_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")  # requirements/cpu.txt installs it
    import pyarrow.parquet as pq

    src = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(published_rows()), src)
    schema = pq.read_schema(src)
    assert str(schema.field("prompt").type) == "list<element: struct<content: string, role: string>>"
    assert main(["dapo", "--in", str(src), "--out", str(tmp_path / "out.jsonl")]) == 3
    check_output(tmp_path / "out.jsonl")


def _fails(capsys, argv, match):
    """A user error: one line `error: ...` on stderr and exit code 2 (as train, eval and convert)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_dapo_errors_name_the_row(tmp_path, capsys):
    rows = published_rows()
    rows[2]["prompt"][0]["content"] = "What is 1+1?"  # no DAPO instruction
    src = tmp_path / "dapo.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fails(capsys, ["dapo", "--in", str(src), "--out", str(tmp_path / "out.jsonl")],
           "row 2: the user message does not carry DAPO")
    assert main(["dapo", "--in", str(src), "--out", str(tmp_path / "out.jsonl"), "--keep-unmatched"]) == 3
    del rows[0]["reward_model"]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fails(capsys, ["dapo", "--in", str(src), "--out", str(tmp_path / "out.jsonl")], "row 0: no reward_model.ground_truth")
    _fails(capsys, ["dapo", "--in", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o.jsonl")],
           "input file not found")
