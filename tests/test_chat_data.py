"""Chat-format prompt rows, the file/``datasets`` sources of PromptDataset, and render_prompts against a
real chat template (SmolLM2-135M-Instruct's)."""

import json
from collections.abc import Mapping

import pytest

from lightrft_lightning.data import PromptDataModule, PromptDataset, render_prompts
from lightrft_lightning.tokenizer import char_tokenizer

SYSTEM_CHAT = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2+2?"}]
USER_CHAT = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"},
             {"role": "user", "content": "Again?"}]
ROWS = [
    {"messages": SYSTEM_CHAT, "answer": "4", "level": 1},
    {"prompt": "raw text 1+1=", "answer": "2", "level": 2},
    {"messages": USER_CHAT, "answer": "hi", "level": 3},
]
GEN_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smol_path():
    from lightrft_lightning import pretrained

    return pretrained.resolve("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smol(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_path, padding_side="left")


def template_ids(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


@pytest.mark.parametrize("case", ["system", "no-system", "prompt-as-user"])
def test_render_ids_equal_the_templates(smol, case):
    row, messages, flag = {
        "system": ({"messages": SYSTEM_CHAT}, SYSTEM_CHAT, False),
        "no-system": ({"messages": USER_CHAT}, USER_CHAT, False),
        "prompt-as-user": ({"prompt": "What is 3+4?"}, [{"role": "user", "content": "What is 3+4?"}], True),
    }[case]
    texts, ids = render_prompts([{**row, "answer": "x", "index": 0}], smol, apply_chat_template=flag)
    assert ids == [template_ids(smol, messages)]
    assert texts == [smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
    assert texts[0].endswith(GEN_PROMPT) and texts[0].startswith("<|im_start|>system\n")
    assert smol.decode(ids[0]) == texts[0]
    if case == "system":
        assert "You add numbers." in texts[0] and "SmolLM" not in texts[0]
    else:  # the template adds its default system prompt
        assert "SmolLM" in texts[0]


def test_render_adds_no_bos_on_top_of_the_template(smol_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_path, padding_side="left", add_bos_token=True)
    bos = tok.bos_token_id
    assert tok("hi").input_ids[0] == bos  # this tokenizer would prepend a BOS to plain text
    texts, ids = render_prompts([{"messages": SYSTEM_CHAT}, {"prompt": "hi"}], tok, apply_chat_template=True)
    assert ids[0] == template_ids(tok, SYSTEM_CHAT) and ids[0][0] == bos and ids[0][1] != bos
    assert ids[1] == template_ids(tok, [{"role": "user", "content": "hi"}])


def test_raw_prompts_unchanged_without_the_flag_and_chats_always_templated(smol):
    rows = [{"prompt": "12+30=", "index": 0}, {"messages": USER_CHAT, "index": 1}, {"prompt": "<|im_start|>x"}]
    texts, ids = render_prompts(rows, smol)
    assert texts[0] == "12+30=" and texts[2] == "<|im_start|>x"
    assert ids[0] == smol("12+30=", add_special_tokens=False).input_ids
    assert ids[2] == smol("<|im_start|>x", add_special_tokens=False).input_ids
    assert texts[1].endswith(GEN_PROMPT) and ids[1] == template_ids(smol, USER_CHAT)
    assert render_prompts([], smol) == ([], [])


def test_no_chat_template_is_an_error_naming_the_tokenizer():
    tok = char_tokenizer()
    tok.name_or_path = "my-char-tok"
    texts, ids = render_prompts([{"prompt": "1+1"}], tok)
    assert texts == ["1+1"] and ids == [tok("1+1", add_special_tokens=False).input_ids]
    with pytest.raises(ValueError, match=r"tokenizer .*'my-char-tok'.* has no chat template, but row 1 needs one "
                                         r"\(a 'messages' row\)"):
        render_prompts([{"prompt": "1+1"}, {"messages": SYSTEM_CHAT}], tok)
    with pytest.raises(ValueError, match=r"has no chat template, but row 0 needs one \(apply_chat_template=True\)"):
        render_prompts([{"prompt": "1+1"}], tok, apply_chat_template=True)


def write_sources(tmp_path, rows):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "data.json").write_text(json.dumps(rows))
    keys = list(dict.fromkeys(k for r in rows for k in r))  # absent fields are nulls in a columnar file
    table = [{k: r.get(k) for k in keys} for r in rows]
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "data.parquet")
    datasets.Dataset.from_list(table).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(table[:1]),
                          "test": datasets.Dataset.from_list(table)}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "folder").mkdir()
    # the splits of one folder share their columns
    (tmp_path / "folder" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table))
    (tmp_path / "folder" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table[:2]))
    return {"jsonl": "data.jsonl", "json": "data.json", "parquet": "data.parquet", "saved": "saved",
            "saved_dict": "saved_dict", "folder": "folder"}


def test_every_source_round_trips_the_rows(tmp_path):
    sources = write_sources(tmp_path, ROWS)
    for kind, name in sources.items():
        ds = PromptDataset.from_file(str(tmp_path / name), split="test")
        assert ds.rows == ROWS, kind
        assert ds[2] == {**ROWS[2], "index": 2}, kind
    assert PromptDataset.from_hf_dataset(str(tmp_path / "saved_dict")).rows == ROWS[:1]
    assert PromptDataset.from_file(str(tmp_path / "folder")).rows == ROWS[:2]  # split="train" by default
    with pytest.raises(ValueError, match=r"saved_dict' has no split 'validation'; "
                                         r"accepted: one of \['test', 'train'\]"):
        PromptDataset.from_file(str(tmp_path / "saved_dict"), split="validation")
    (tmp_path / "q.csv").write_text("question,answer\n1+1,2\n2+2,4\n")
    assert PromptDataset.from_file(str(tmp_path / "q.csv"), prompt_key="question").rows == [
        {"prompt": "1+1", "answer": 2}, {"prompt": "2+2", "answer": 4}]


BAD_ROWS = [
    ({"messages": "hi"}, r"field 'messages' is str 'hi'; accepted: a non-empty list of \{'role'"),
    ({"messages": []}, r"field 'messages' is list \[\]; accepted: a non-empty list"),
    ({"messages": ["hi"]}, r"field 'messages\[0\]' is str 'hi'; accepted: a dict"),
    ({"messages": [{"role": "tool", "content": "x"}]},
     r"field 'messages\[0\]\.role' is 'tool'; accepted: one of 'system', 'user', 'assistant'"),
    ({"messages": [{"role": "user", "content": ["x"]}]},
     r"field 'messages\[0\]\.content' is list .*accepted: a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     r"field 'messages' ends with an assistant message"),
    ({"prompt": "x", "messages": SYSTEM_CHAT}, r"has both 'prompt' and 'messages'; accepted: exactly one"),
    ({"answer": "4"}, r"has no string field 'prompt'; accepted: .*'messages'.*\(got keys \['answer'\]\)"),
    ({"prompt": 3}, r"has no string field 'prompt': it is int 3; accepted: a string"),
]


@pytest.mark.parametrize("row,match", BAD_ROWS, ids=[str(i) for i in range(len(BAD_ROWS))])
def test_bad_rows_name_the_row_and_field(tmp_path, row, match):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"data\.jsonl:3:? {match}"):
        PromptDataset.from_file(str(path))
    with pytest.raises(ValueError, match=rf"prompt row 1:? {match}"):
        PromptDataset([ROWS[1], row])


def test_bad_rows_in_columnar_files_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([ROWS[0], {"messages": [{"role": "robot", "content": "x"}]}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet row 1: field 'messages\[0\]\.role' is 'robot'"):
        PromptDataset.from_file(str(tmp_path / "bad.parquet"))
    (tmp_path / "bad.json").write_text(json.dumps([ROWS[0], {"prompt": "a", "messages": USER_CHAT}]))
    with pytest.raises(ValueError, match=r"bad\.json\[1\] has both 'prompt' and 'messages'"):
        PromptDataset.from_file(str(tmp_path / "bad.json"))


def test_unsupported_and_unreadable_sources(tmp_path):
    (tmp_path / "p.txt").write_text("hello\n")
    for call in (lambda: PromptDataset.from_file(str(tmp_path / "p.txt")),
                 lambda: PromptDataModule(path=str(tmp_path / "p.txt")),
                 lambda: PromptDataModule(prompts=["a"], val_path=str(tmp_path / "p.txt"))):
        with pytest.raises(ValueError, match=r"p\.txt' has suffix '\.txt', which is not read; accepted suffixes: "
                                             r"\.jsonl, \.json, \.parquet, \.csv"):
            call()
    (tmp_path / "empty").mkdir()
    with pytest.raises(IsADirectoryError, match=r"empty' is a directory; accepted: .*Hugging Face datasets directory"):
        PromptDataset.from_file(str(tmp_path / "empty"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"broken\.parquet' cannot be read as Parquet"):
        PromptDataset.from_file(str(tmp_path / "broken.parquet"))
    (tmp_path / "obj.json").write_text('{"prompt": "a"}')
    with pytest.raises(ValueError, match=r"obj\.json' holds a JSON dict; accepted: a JSON list of rows"):
        PromptDataset.from_file(str(tmp_path / "obj.json"))
    (tmp_path / "bad.json").write_text('[{"prompt": "a"},\n oops]')
    with pytest.raises(ValueError, match=r"bad\.json:2:2: not valid JSON"):
        PromptDataset.from_file(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet' does not exist; accepted: a JSONL file"):
        PromptDataModule(path=str(tmp_path / "missing.parquet"))


def test_datamodule_from_parquet_keeps_messages_and_metadata(tmp_path):
    sources = write_sources(tmp_path, ROWS * 2)
    data = PromptDataModule(path=str(tmp_path / sources["parquet"]), batch_size=3, shuffle=False,
                            val_path=str(tmp_path / sources["saved_dict"]), val_split="train")
    batches = list(data.train_dataloader())
    assert len(batches) == 2 and batches[1]["index"].tolist() == [3, 4, 5]
    assert [{k: v for k, v in r.items() if k != "index"} for b in batches for r in b["rows"]] == ROWS * 2
    assert batches[0]["rows"][0]["messages"] == SYSTEM_CHAT and batches[0]["rows"][0]["level"] == 1
    assert "prompt" not in batches[0]["rows"][0] and "messages" not in batches[0]["rows"][1]
    (val,) = list(data.val_dataloader())
    assert val["rows"] == [{**ROWS[0], "index": 0}]
