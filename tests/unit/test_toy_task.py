"""Toy addition task: generator, solutions, tokenizer and the shipped teacher/student models."""
import json

import pytest

from megatron_tip.eval.grading import extract_boxed, grade

from tests.helpers.paths import TOY

from task import format_prompt, generate_problems, solve, split_problems  # noqa: E402

MODELS = TOY / "models"


def test_generator_is_deterministic_and_seeded():
    a = generate_problems(50, seed=7)
    assert a == generate_problems(50, seed=7)
    assert a != generate_problems(50, seed=8)
    assert split_problems("heldout", 20) == split_problems("heldout", 20)
    with pytest.raises(ValueError, match="split"):
        split_problems("test", 3)
    with pytest.raises(ValueError, match="min_digits"):
        generate_problems(3, seed=0, min_digits=4, max_digits=2)


@pytest.mark.slow  # ~10 s of problem generation
def test_heldout_disjoint_from_train():
    held = {p.problem for p in split_problems("heldout", 200)}
    assert len(held) == 200
    assert not held & {p.problem for p in split_problems("train", 2000)}


def test_solutions_are_correct_and_grade():
    for p in generate_problems(300, seed=3, min_digits=1, max_digits=4):
        a, b = map(int, p.problem.split("+"))
        assert p.answer == str(a + b)
        assert extract_boxed(p.solution) == p.answer
        assert grade(p.solution, p.answer) and grade(p.solution, p.answer, string_match=False)
        # Every step line is a true column addition.
        for line in p.solution.splitlines()[:-1]:
            lhs, rhs = line.split("=")
            assert sum(map(int, lhs.split("+"))) == int(rhs)
    assert solve(478, 356) == "8+6=14\n7+5+1=13\n4+3+1=8\n\\boxed{834}"
    assert solve(99, 1) == "9+1=10\n9+0+1=10\n\\boxed{100}"
    assert format_prompt("1+2") == "Q: 1+2\nA: "


def _tokenizer():
    from transformers import AutoTokenizer

    if not (MODELS / "teacher" / "tokenizer.json").is_file():
        pytest.skip("toy models not built (run examples/toy/train_models.py)")
    return AutoTokenizer.from_pretrained(MODELS / "teacher")


def test_tokenizer_loads_and_round_trips():
    tok = _tokenizer()
    assert None not in (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    for p in generate_problems(20, seed=1):
        text = format_prompt(p.problem) + p.solution
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        # The prompt tokenizes as a prefix of prompt+solution (rollouts append sampled ids to it).
        assert ids[: len(tok(format_prompt(p.problem)).input_ids)] == tok(format_prompt(p.problem)).input_ids
    for d in "0123456789":
        assert len(tok(d, add_special_tokens=False).input_ids) == 1
    assert len(tok("\\boxed{", add_special_tokens=False).input_ids) == 1
    assert tok.decode(tok("any text ü €\t", add_special_tokens=False).input_ids) == "any text ü €\t"  # byte fallback


def test_shipped_models_share_vocab_and_teacher_is_accurate():
    import torch
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    teacher = AutoModelForCausalLM.from_pretrained(MODELS / "teacher")
    student = AutoModelForCausalLM.from_pretrained(MODELS / "student")
    assert teacher.config.vocab_size == student.config.vocab_size == len(tok)
    assert teacher.config.head_dim == student.config.head_dim == 64  # vLLM rejects small head dims
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(student) < n_params(teacher) / 2
    assert student.config.num_key_value_heads % 2 == 0  # splits for TP=2 (trainer and vLLM tests)
    held = [json.loads(line) for line in (TOY / "data" / "heldout.jsonl").read_text().splitlines()][:20]
    tok.padding_side = "left"
    enc = tok([format_prompt(r["problem"]) for r in held], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = teacher.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    acc = sum(grade(t, r["answer"]) for t, r in zip(texts, held)) / len(held)
    assert acc >= 0.8, f"teacher greedy accuracy {acc:.2f} on 20 held-out problems"
