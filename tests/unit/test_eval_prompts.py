"""Prompt building (plain, template file, chat template) and the evaluator with a pluggable generate fn."""
import pytest
from megatron_tip.data.prompts import INSTRUCTION, PLAIN_TEMPLATE, build_prompt, resolve_format
from megatron_tip.eval.runner import check_hf_dir, evaluate
from tests.helpers.paths import REPO


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
        "<think></think>{% endif %}{% endif %}")


def test_plain_and_template_prompts(tokenizer, tmp_path):
    assert tokenizer.chat_template is None
    fmt = resolve_format(tokenizer)
    assert fmt.template == PLAIN_TEMPLATE and fmt.add_special_tokens
    assert build_prompt("1+1?", tokenizer=tokenizer, fmt=fmt) == f"Problem: 1+1?\n{INSTRUCTION}\nAnswer:"
    (tmp_path / "prompt_template.txt").write_text("Q: {problem}\nA: ")
    fmt = resolve_format(tokenizer, model_dir=tmp_path)
    assert build_prompt("12+3", fmt=fmt) == "Q: 12+3\nA: "
    with pytest.raises(ValueError, match="chat template"):
        resolve_format(tokenizer, fmt="chat")
    with pytest.raises(ValueError, match="problem"):
        resolve_format(tokenizer, fmt="no field")


def test_toy_template_file_matches_task(tokenizer):
    from task import format_prompt

    toy_dir = REPO / "examples" / "toy" / "models" / "student"
    if not toy_dir.is_dir():
        pytest.skip("toy models not built")
    fmt = resolve_format(tokenizer, model_dir=toy_dir)
    assert build_prompt("123+45", fmt=fmt) == format_prompt("123+45")


def test_chat_template_with_enable_thinking(tokenizer):
    tokenizer.chat_template = CHAT
    try:
        fmt = resolve_format(tokenizer, enable_thinking=False)
        assert fmt.template is None and not fmt.add_special_tokens
        text = build_prompt("What is 2+2?", tokenizer=tokenizer, fmt=fmt)
        assert text == f"<|user|>What is 2+2?\n{INSTRUCTION}\n<|assistant|><think></think>"
        on = build_prompt("x", tokenizer=tokenizer, fmt=resolve_format(tokenizer, enable_thinking=True))
        assert on.endswith("<|assistant|>")
    finally:
        tokenizer.chat_template = None


def test_megatron_checkpoint_gets_conversion_hint(tmp_path):
    (tmp_path / "model_spec.json").write_text("{}")
    from megatron_tip.eval.runner import ModelDirError

    with pytest.raises(ModelDirError, match="megatron_tip.convert megatron-to-hf"):  # library code: no SystemExit
        check_hf_dir(tmp_path)


def test_evaluate_with_pluggable_generate_fn():
    problems = [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": "4"}]

    def fake(prompts, n):  # right for the first problem once, always wrong for the second
        return [["\\boxed{2}"] + ["\\boxed{3}"] * (n - 1) if "1+1" in p else ["\\boxed{5}"] * n for p in prompts]

    rows, summary = evaluate(problems, fake, samples=4, prompt_fn=lambda p: p, progress=False)
    assert [r["correct"] for r in rows] == [[True, False, False, False], [False] * 4]
    assert summary["mean@4"] == pytest.approx(0.125)
    assert summary["pass@k"] == pytest.approx({1: 0.125, 2: 0.25, 4: 0.5})


@pytest.mark.parametrize("argv,match", [
    (["--limit", "0"], "--limit=0: must be >= 1"), (["--limit", "-1"], "--limit=-1: must be >= 1"),
    (["--temperature", "-1"], "--temperature=-1.0: must be >= 0"), (["--batch-size", "0"], "--batch-size=0"),
])
def test_eval_cli_rejects_bad_numbers(argv, match, capsys):
    from megatron_tip.eval.__main__ import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "m", "--data", "d", *argv])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_eval_cli_reads_data_first_and_leaves_no_temp_dirs(tmp_path, capsys):
    import glob
    import tempfile

    from megatron_tip.eval.__main__ import main

    pattern = f"{tempfile.gettempdir()}/megatron_tip_eval_*"
    before = set(glob.glob(pattern))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(['{"problem": "1+1", "answer": "2"}'] * 20) + '\n{"problem": oops}\n')
    with pytest.raises(SystemExit) as e:  # the data error wins although the model does not exist either
        main(["--model", str(tmp_path / "no_model"), "--data", str(bad)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}:21: not valid JSON (Expecting value)"]
    good = tmp_path / "good.jsonl"
    good.write_text('{"problem": "1+1", "answer": "2"}\n')
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "no_model"), "--data", str(good)])
    assert set(glob.glob(pattern)) == before
