"""Prompt datasets (JSONL / parquet) and the epoch sampler."""

from __future__ import annotations

import json

import pytest

from stream_rl.config import DataConfig
from stream_rl.data import DataError, PromptDataset, PromptSampler


@pytest.fixture(scope="module")
def tok():
    from stream_rl.tiny.model import build_tokenizer

    return build_tokenizer()


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def load(tok, path, **cfg) -> PromptDataset:
    return PromptDataset.load(DataConfig(path=str(path), **cfg), tok)


ROWS = [{"prompt": "12a=", "answer": "0"}, {"prompt": "57e=", "answer": "2"}, {"prompt": "90c=", "answer": "0"}]


# --- JSONL -------------------------------------------------------------------------------

def test_jsonl_loads(tok, tmp_path):
    ds = load(tok, write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert [r.prompt for r in ds.rows] == ["12a=", "57e=", "90c="]
    assert [r.answer for r in ds.rows] == ["0", "2", "0"]
    assert [r.index for r in ds.rows] == [0, 1, 2]
    assert ds.overlong == []
    assert ds.source.endswith("d.jsonl")
    for r in ds.rows:
        assert r.prompt_ids == tuple(tok(r.prompt).input_ids)
        assert tok.decode(list(r.prompt_ids)) == r.prompt


def test_custom_field_names_and_blank_lines(tok, tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question": "1+1", "solution": "2"}) + "\n\n" +
                 json.dumps({"question": "2+2", "solution": "4"}) + "\n")
    ds = load(tok, p, prompt_field="question", answer_field="solution")
    assert [(r.prompt, r.answer) for r in ds.rows] == [("1+1", "2"), ("2+2", "4")]


def test_row_missing_prompt_field_names_row_and_field(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], {"question": "x", "answer": "1"}])
    with pytest.raises(DataError) as info:
        load(tok, path)
    msg = str(info.value)
    # file:line counted from 1, the field, the key that names it, and what the row has
    assert "d.jsonl:3:" in msg and "'prompt'" in msg and "data.prompt_field" in msg and "'question'" in msg


def test_row_missing_answer_field(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12a="}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*'answer'.*data.answer_field"):
        load(tok, path)


@pytest.mark.parametrize("prompt", [5, None, ["a"], "", "   "])
def test_prompt_must_be_non_empty_string(tok, tmp_path, prompt):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": prompt, "answer": "1"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*'prompt'.*data.prompt_field.*non-empty string"):
        load(tok, path)


@pytest.mark.parametrize("answer,expected", [(3, "3"), (-7, "-7"), (0.5, "0.5")])
def test_numeric_answer_accepted_as_string(tok, tmp_path, answer, expected):
    ds = load(tok, write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12a=", "answer": answer}]))
    assert ds.rows[0].answer == expected


@pytest.mark.parametrize("answer", [True, None, ""])
def test_bad_answer_rejected(tok, tmp_path, answer):
    with pytest.raises(DataError, match="'answer'"):
        load(tok, write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12a=", "answer": answer}]))


def test_row_that_is_not_an_object(tok, tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl:2: .*must be an object"):
        load(tok, write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "[1, 2]"]))


def test_invalid_json_names_line_number(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], "{not json", ROWS[2]])
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        load(tok, path)


def test_overlong_prompts_set_aside_and_counted(tok, tmp_path):
    rows = [{"prompt": "12a=", "answer": "0"},  # 4 tokens
            {"prompt": "x" * 9, "answer": "1"},  # 9 tokens
            {"prompt": "57e=", "answer": "2"},
            {"prompt": "y" * 6, "answer": "3"}]  # 6 tokens
    ds = load(tok, write_jsonl(tmp_path / "d.jsonl", rows), max_prompt_tokens=5)
    assert ds.overlong == [1, 3]
    assert [r.index for r in ds.rows] == [0, 2]
    assert [r.prompt for r in ds.rows] == ["12a=", "57e="]


def test_prompt_exactly_at_limit_is_kept(tok, tmp_path):
    ds = load(tok, write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abcde", "answer": "1"}]), max_prompt_tokens=5)
    assert ds.overlong == [] and len(ds.rows) == 1


def test_all_rows_overlong(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 20, "answer": "1"}] * 3)
    with pytest.raises(DataError, match="no usable prompts.*3 longer than data.max_prompt_tokens=4"):
        load(tok, path, max_prompt_tokens=4)


def test_empty_file(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match="no usable prompts"):
        load(tok, p)


def test_chat_template_not_requested_adds_nothing(tok, tmp_path):
    ds = load(tok, write_jsonl(tmp_path / "d.jsonl", [ROWS[0]]))
    assert len(ds.rows[0].prompt_ids) == len("12a=")


def test_blank_lines_keep_the_line_numbers_of_the_file(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:4: missing field 'answer'"):
        load(tok, p)


# --- chat templates ------------------------------------------------------------------------

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tok():
    from stream_rl.tiny.model import build_tokenizer

    t = build_tokenizer()
    t.chat_template = TEMPLATE
    return t


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_chat_template_renders_token_ids(chat_tok, tmp_path, system):
    """transformers 5's apply_chat_template(tokenize=True) returns an encoding
    object, whose list() is its keys: the prompt must be the template's ids."""
    ds = load(chat_tok, write_jsonl(tmp_path / "d.jsonl", ROWS[:2]), apply_chat_template=True,
              system_prompt=system)
    for row in ds.rows:
        assert all(isinstance(t, int) for t in row.prompt_ids)
        want = chat_tok.apply_chat_template(([{"role": "system", "content": system}] if system else []) +
                                            [{"role": "user", "content": row.prompt}],
                                            add_generation_prompt=True, tokenize=False)
        assert chat_tok.decode(list(row.prompt_ids)) == want
        assert ("Answer briefly." in want) == (system is not None)


def test_chat_template_missing_is_an_error_naming_the_key(tok, tmp_path):
    with pytest.raises(DataError, match="data.apply_chat_template is true.*no chat template"):
        load(tok, write_jsonl(tmp_path / "d.jsonl", ROWS), apply_chat_template=True)


# --- JSON arrays, CSV, parquet and missing files --------------------------------------------

def test_json_array_is_read_as_rows(tok, tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"q": "12a=", "a": 0}, {"q": "57e=", "a": "2"}], indent=2))
    ds = load(tok, p, prompt_field="q", answer_field="a")
    assert [(r.prompt, r.answer) for r in ds.rows] == [("12a=", "0"), ("57e=", "2")]
    p.write_text(json.dumps([{"q": "12a=", "a": 0}, {"a": "2"}]))
    with pytest.raises(DataError, match=r"d\.json row 2: missing field 'q' \(set by data.prompt_field"):
        load(tok, p, prompt_field="q", answer_field="a")
    # JSON lines under a .json name still read as lines.
    assert len(load(tok, write_jsonl(tmp_path / "l.json", ROWS)).rows) == 3


def test_csv_is_read_with_its_header(tok, tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('question,final\n12a=,0\n"57e=",2\n90c=,\n')
    with pytest.raises(DataError, match=r"d\.csv:4: field 'final' \(set by data.answer_field\)"):
        load(tok, p, prompt_field="question", answer_field="final")
    p.write_text('question,final\n12a=,0\n"57e=",2\n')
    ds = load(tok, p, prompt_field="question", answer_field="final")
    assert [(r.prompt, r.answer) for r in ds.rows] == [("12a=", "0"), ("57e=", "2")]


def test_tokenizer_that_gives_no_ids_is_an_error(tmp_path):
    from stream_rl.data import render_prompt

    class Broken:  # as apply_chat_template(tokenize=True) under transformers 5, listed
        def __call__(self, text, add_special_tokens=True):
            return type("Enc", (), {"input_ids": ["input_ids", "attention_mask"]})()

    with pytest.raises(DataError, match="not token ids"):
        render_prompt(DataConfig(), Broken(), "x")



def test_parquet_loads(tok, tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": [r["prompt"] for r in ROWS], "answer": [r["answer"] for r in ROWS],
                             "extra": [1, 2, 3]}), path)
    ds = load(tok, path)
    assert [(r.prompt, r.answer) for r in ds.rows] == [(r["prompt"], r["answer"]) for r in ROWS]


@pytest.mark.parametrize("name,fmt", [("nope.jsonl", "auto"), ("nope.parquet", "auto"), ("nope.txt", "jsonl")])
def test_missing_file(tok, tmp_path, name, fmt):
    with pytest.raises(DataError, match="does not exist") as info:
        load(tok, tmp_path / name, format=fmt)
    assert name in str(info.value)


def test_unknown_suffix_asks_for_format(tok, tmp_path):
    p = tmp_path / "data.txt"
    p.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataError, match="data.format"):
        load(tok, p)
    assert load(tok, p, format="jsonl").rows[0].prompt == "12a="


# --- PromptSampler -------------------------------------------------------------------------

@pytest.fixture
def dataset(tok, tmp_path) -> PromptDataset:
    rows = [{"prompt": f"{10 + i}a=", "answer": "0"} for i in range(7)]
    return load(tok, write_jsonl(tmp_path / "d.jsonl", rows))


def draw(sampler: PromptSampler, n: int) -> list[int]:
    return [sampler.next().index for _ in range(n)]


def test_sampler_covers_every_row_once_per_epoch(dataset):
    s = PromptSampler(dataset, shuffle=True, seed=0)
    for epoch in range(1, 6):
        assert sorted(draw(s, 7)) == list(range(7))
        assert s.epoch == epoch


def test_sampler_reshuffles_each_epoch(dataset):
    s = PromptSampler(dataset, shuffle=True, seed=0)
    orders = {tuple(draw(s, 7)) for _ in range(6)}
    assert len(orders) > 1


def test_sampler_deterministic_per_seed(dataset):
    a = draw(PromptSampler(dataset, shuffle=True, seed=42), 30)
    b = draw(PromptSampler(dataset, shuffle=True, seed=42), 30)
    c = draw(PromptSampler(dataset, shuffle=True, seed=43), 30)
    assert a == b
    assert a != c


def test_sampler_without_shuffle_is_in_order(dataset):
    assert draw(PromptSampler(dataset, shuffle=False, seed=0), 14) == list(range(7)) * 2


# --- DPPO's prompt-level pruning ---------------------------------------------------------------

def test_dppo_prompt_sampler_prunes_low_history_prompts_after_the_first_epoch(dataset):
    from stream_rl.data import DppoPromptSampler

    s = DppoPromptSampler(PromptSampler(dataset, shuffle=True, seed=0), rate=0.6, seed=1)
    first = [s.next() for _ in range(7)]  # first epoch: nothing pruned, even with history
    assert sorted(r.index for r in first) == list(range(7)) and all(r.inclusion == 1.0 for r in first)
    for r in first:
        s.record(r.prompt_ids, float(r.index))  # rows 0-2 score below the median (3)
    seen = {i: 0 for i in range(7)}
    for _ in range(3000):
        r = s.next()
        seen[r.index] += 1
        assert r.inclusion == (pytest.approx(0.4) if r.index < 3 else 1.0)
    # Each epoch offers every row once; a low one survives with probability 0.4.
    epochs = s.epoch - 1
    for i in range(3, 7):
        assert abs(seen[i] - epochs) <= 1
    for i in range(3):
        assert seen[i] == pytest.approx(0.4 * epochs, rel=0.15)
    assert s.skipped == pytest.approx(3 * 0.6 * epochs, rel=0.1)


def test_dppo_prompt_sampler_rate_zero_is_the_plain_sampler(dataset):
    from stream_rl.data import DppoPromptSampler

    plain = draw(PromptSampler(dataset, shuffle=True, seed=5), 30)
    s = DppoPromptSampler(PromptSampler(dataset, shuffle=True, seed=5), rate=0.0, seed=1)
    for i in range(7):
        s.record(dataset.rows[i].prompt_ids, float(i))
    assert draw(s, 30) == plain
    with pytest.raises(ValueError, match="dppo_prompt_rate"):
        DppoPromptSampler(PromptSampler(dataset, shuffle=True, seed=5), rate=1.0, seed=1)


# --- sampler state (resume) ---------------------------------------------------------

@pytest.mark.parametrize("dppo", [False, True])
def test_sampler_state_round_trip_continues_the_same_draws(tok, tmp_path, dppo):
    from stream_rl.data import DppoPromptSampler

    rows = [{"prompt": f"{i}{i}a=", "answer": str(i)} for i in range(7)]
    ds = load(tok, write_jsonl(tmp_path / "d.jsonl", rows))

    def sampler():
        s = PromptSampler(ds, shuffle=True, seed=3)
        return DppoPromptSampler(s, 0.5, 3) if dppo else s

    a = sampler()
    for i in range(10):  # into the second epoch
        row = a.next()
        if dppo:
            a.record(row.prompt_ids, float(i % 3))
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    b = sampler()
    b.load_state_dict(state)
    assert [(r.prompt_ids, r.inclusion) for r in (a.next() for _ in range(12))] == \
        [(r.prompt_ids, r.inclusion) for r in (b.next() for _ in range(12))]
    other = load(tok, write_jsonl(tmp_path / "e.jsonl", rows[:3]))
    with pytest.raises(ValueError, match="7 prompts; the dataset has 3"):
        PromptSampler(other, shuffle=True, seed=3).load_state_dict(state["sampler"] if dppo else state)


def test_eval_reads_its_questions_naming_eval_keys(tok, tmp_path):
    """Eval reads the reference with eval.answer_field: an error names that key, not data's."""
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "12a=", "answer": "0"}])
    with pytest.raises(DataError, match=r"e\.jsonl:1: missing field 'target' \(set by eval.answer_field"):
        PromptDataset.load(DataConfig(path=path, answer_field="target"), tok, section="eval")


@pytest.mark.parametrize("suffix, good", [(".jsonl", '{"prompt": "a", "answer": "1"}\n'),
                                          (".json", '{"prompt": "a", "answer": "1"}\n'),
                                          (".csv", "prompt,answer\na,1\n")])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, suffix, good):
    from stream_rl.config import DataConfig
    from stream_rl.data import DataError, _read_rows

    path = tmp_path / f"rows{suffix}"
    path.write_bytes(good.encode() + good.splitlines()[-1].encode()[:3] + b"\xff\xfe rest\n")
    with pytest.raises(DataError, match=rf"{path.name}:{good.count(chr(10)) + 1}: not UTF-8 text \(byte 0xff"):
        _read_rows(DataConfig(path=str(path)))


def test_a_json_line_may_hold_a_line_separator(tmp_path):
    from stream_rl.config import DataConfig
    from stream_rl.data import _read_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a\u2028b", "answer": "1"}\n{"prompt": "c", "answer": "2"}\n', encoding="utf-8")
    rows, _ = _read_rows(DataConfig(path=str(path)))
    assert [(where.rsplit(":", 1)[1], r["prompt"]) for where, r in rows] == [("1", "a\u2028b"), ("2", "c")]
