"""data/prepare.py and data/synthetic.py: input formats, chat formats (ChatML, Llama 3) and the loss mask,
bad input, atomic output, tokenizers, workers and streaming, Table 1 length sampling, the synthetic dataset."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import LLAMA3_SPECIALS, ROOT, tokenizer_dir
from data.prepare import DataError, encode_chat, get_tokenizer, load_dataset, prepare
from data.synthetic import MIN_LEN, TABLE1, THRESHOLDS, make_synthetic, sample_lengths, scale_ref

CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]}
PR = {"prompt": "hi", "response": "hello", "id": 7}  # extra keys are ignored


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return str(path)


def listing(d):
    return sorted(os.listdir(d))


def test_prepare_both_formats_and_mask(tmp_path):
    src = write_jsonl(tmp_path / "sft.jsonl", [CHAT, "", PR])  # a blank line in the middle is skipped
    out = prepare(src, tmp_path / "out", tokenizer="byte", verbose=False)
    ds = load_dataset(out)
    tok = get_tokenizer("byte")
    assert len(ds) == 2 and ds.meta["n_seqs"] == 2
    assert listing(out) == ["mask.bin", "meta.json", "offsets.bin", "tokens.bin"]
    ids, mask = ds.get(0)
    assert ids.dtype == np.int64 and mask.dtype == bool
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                               "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                               "<|im_start|>assistant\n4<|im_end|>\n")
    # trained tokens: exactly the assistant contents and their closing <|im_end|>, as contiguous runs
    assert tok.decode(ids[mask]) == "hello<|im_end|>4<|im_end|>"
    runs = np.flatnonzero(np.diff(mask.astype(int)) != 0) + 1
    assert [tok.decode(ids[a:b]) for a, b in zip(runs[::2], runs[1::2])] == ["hello<|im_end|>", "4<|im_end|>"]
    ids1, mask1 = ds.get(1)
    assert tok.decode(ids1) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert tok.decode(ids1[mask1]) == "hello<|im_end|>"
    assert ds.lengths.dtype == np.int64 and ds.lengths.tolist() == [len(ids), len(ids1)]
    m = ds.meta
    assert (m["vocab_size"], m["im_start_id"], m["im_end_id"], m["eos_id"], m["pad_id"]) == (264, 256, 257, 257, 259)
    assert m["n_tokens"] == len(ids) + len(ids1) and m["n_trained_tokens"] == int(mask.sum() + mask1.sum())
    assert ds.get(-1)[0].tolist() == ids1.tolist()
    with pytest.raises(IndexError):
        ds.get(2)


SHAREGPT = {"conversations": [  # CHAT in ShareGPT's words
    {"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
    {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
ALPACA = {"instruction": "Add.", "input": "2+2", "output": "4", "system": "Be brief."}
# Meta-Llama-3-8B-Instruct's chat_template (tokenizer_config.json), the reference for the llama3 rendering
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def trained_runs(tok, ids, mask):
    """The decoded runs of consecutive trained tokens."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return [tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def test_sharegpt_and_alpaca(tmp_path):
    """ShareGPT and Alpaca lines, told apart by their keys, give the conversation their fields describe."""
    from data.prepare import parse_sample
    assert parse_sample(SHAREGPT) == parse_sample(CHAT)
    assert parse_sample({"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "hello"}],
                         "system": "Be brief."}) == [("system", "Be brief."), ("user", "hi"), ("assistant", "hello")]
    assert parse_sample(ALPACA) == [("system", "Be brief."), ("user", "Add.\n2+2"), ("assistant", "4")]
    for empty_input in ({"instruction": "hi", "input": "", "output": "hello"}, {"instruction": "hi", "output": "hello"}):
        assert parse_sample(empty_input) == parse_sample(PR) == [("user", "hi"), ("assistant", "hello")]
    assert parse_sample({"instruction": "", "input": "2+2", "output": "4"}) == [("user", "2+2"), ("assistant", "4")]
    src = write_jsonl(tmp_path / "mixed.jsonl", [SHAREGPT, CHAT, ALPACA, {"instruction": "hi", "input": "", "output": "hello"}, PR])
    ds = load_dataset(prepare(src, tmp_path / "out", tokenizer="byte", verbose=False))
    tok = get_tokenizer("byte")
    assert ds.get(0)[0].tolist() == ds.get(1)[0].tolist() and ds.get(3)[0].tolist() == ds.get(4)[0].tolist()
    ids, mask = ds.get(2)
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd.\n2+2<|im_end|>\n"
                               "<|im_start|>assistant\n4<|im_end|>\n")
    assert trained_runs(tok, ids, mask) == ["4<|im_end|>"]


def test_llama3_chat_format(tmp_path):
    """--chat_format=llama3: Llama 3's layout, content stripped as its template does, and the same mask
    (the assistant's content and its <|eot_id|>); sample.py's prompt is the sample up to the answer."""
    turns = [dict(m, content=f" {m['content']}\n") for m in CHAT["messages"]]  # surrounding whitespace: stripped
    src = write_jsonl(tmp_path / "s.jsonl", [{"messages": turns}, PR])
    ds = load_dataset(prepare(src, tmp_path / "out", tokenizer="byte", chat_format="llama3", verbose=False))
    tok = get_tokenizer("byte")
    ids, mask = ds.get(0)
    assert tok.decode(ids) == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
                               "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")
    assert trained_runs(tok, ids, mask) == ["hello<|eot_id|>", "4<|eot_id|>"]
    m = ds.meta
    assert (m["chat_format"], m["eos_id"], m["pad_id"], m["vocab_size"]) == ("llama3", 263, 259, 264)
    assert m["specials"] == {"<|begin_of_text|>": 260, "<|start_header_id|>": 261, "<|end_header_id|>": 262, "<|eot_id|>": 263}
    from sample import chat_prompt
    ids1, mask1 = ds.get(1)
    prompt = chat_prompt(tok, "hi", None, m["chat_format"])
    assert prompt == ids1[:int(mask1.argmax())].tolist()  # up to the first trained token, exactly
    with pytest.raises(ValueError, match=r"cl100k_base has no <\|begin_of_text\|>.*llama3 chat format needs"):
        prepare(src, tmp_path / "out2", tokenizer="cl100k_base", chat_format="llama3", verbose=False)
    assert listing(tmp_path) == ["out", "s.jsonl"]


def test_llama3_tokenizer_dir(tmp_path):
    """A Llama 3 checkpoint's tokenizer (its special tokens) selects the llama3 format; the ids equal the
    tokenizer applied to the text Meta's chat template renders, so the separate encoding of header, content
    and end of turn loses nothing."""
    import jinja2
    ckpt, hf = tokenizer_dir(tmp_path / "llama", LLAMA3_SPECIALS, {"vocab_size": 320})
    src = write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, ALPACA])
    ds = load_dataset(prepare(src, tmp_path / "out", tokenizer=ckpt, verbose=False))
    tok = get_tokenizer(ckpt)
    assert (ds.meta["chat_format"], ds.meta["eos_id"], ds.meta["pad_id"], ds.meta["vocab_size"]) == ("llama3", 4, 5, 320)
    template = jinja2.Environment().from_string(LLAMA3_TEMPLATE)
    from data.prepare import parse_sample
    from sample import chat_prompt
    for i, obj in enumerate([SHAREGPT, ALPACA]):
        messages = [{"role": r, "content": c} for r, c in parse_sample(obj)]
        text = template.render(messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=False)
        ids, mask = ds.get(i)
        assert tok.decode(ids) == text and ids.tolist() == hf.encode(text, add_special_tokens=False).ids
        assert trained_runs(tok, ids, mask) == [c + "<|eot_id|>" for r, c in parse_sample(obj) if r == "assistant"]
    text = template.render(messages=[{"role": "user", "content": "hi"}], bos_token="<|begin_of_text|>",
                           add_generation_prompt=True)
    assert chat_prompt(tok, "hi") == hf.encode(text, add_special_tokens=False).ids
    ckpt, _ = tokenizer_dir(tmp_path / "plain", ["<|endoftext|>"])
    with pytest.raises(RuntimeError, match="no supported chat format"):
        get_tokenizer(ckpt)


def test_workers_give_the_same_output_and_errors(tmp_path):
    """Blocks of lines tokenized by 2 processes give the bytes one process gives; a bad line is reported
    with its own line number (the first in the file when there are several) and leaves nothing behind."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        answer = "x" * int(rng.integers(1, 300))
        rows.append([CHAT, SHAREGPT, ALPACA, {"prompt": str(i), "response": answer}][i % 4] if i % 7 else "")
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    kw = dict(tokenizer="byte", verbose=False, chunk_bytes=2000)  # about 20 blocks
    outs = [prepare(src, tmp_path / "one", workers=1, **kw), prepare(src, tmp_path / "two", workers=2, **kw),
            prepare(src, tmp_path / "whole", workers=1, tokenizer="byte", verbose=False)]  # a single block
    for f in ("tokens.bin", "mask.bin", "offsets.bin", "meta.json"):
        data = [open(os.path.join(o, f), "rb").read() for o in outs]
        assert data[0] == data[1] == data[2], f
    assert len(load_dataset(outs[1])) == sum(1 for r in rows if r)
    bad = list(rows)
    bad[299] = '{"prompt": "no response"}'  # line 300, in a late block
    write_jsonl(tmp_path / "bad.jsonl", bad)
    for lines, want in (([300], 300), ([300, 120], 120)):
        for n in lines:
            bad[n - 1] = '{"prompt": "no response"}'
        src = write_jsonl(tmp_path / "bad.jsonl", bad)
        with pytest.raises(DataError, match=rf"bad\.jsonl:{want}: has no 'response'"):
            prepare(src, tmp_path / "out", workers=2, **kw)
    assert listing(tmp_path) == ["bad.jsonl", "one", "s.jsonl", "two", "whole"]


def test_a_dead_worker_fails_cleanly(tmp_path, monkeypatch):
    """A worker killed mid-run (out of memory, kill -9) ends prepare() with an error, not a hang, and leaves
    nothing behind."""
    import data.prepare as prep
    real = prep._tokenize_block

    def dies_on_line_200(job, first, block):
        if first <= 200 < first + block.count(b"\n"):
            os._exit(1)
        return real(job, first, block)
    dies_on_line_200.__module__, dies_on_line_200.__qualname__ = "data.prepare", "_tokenize_block"  # pickled by name
    monkeypatch.setattr(prep, "_tokenize_block", dies_on_line_200)
    src = write_jsonl(tmp_path / "s.jsonl", [PR] * 400)
    with pytest.raises(RuntimeError, match="terminated abruptly"):
        prepare(src, tmp_path / "out", tokenizer="byte", verbose=False, workers=2, chunk_bytes=500)
    assert listing(tmp_path) == ["s.jsonl"]


def test_blocks_are_whole_lines(tmp_path):
    """The reader's blocks: whole lines, each block's first line numbered right, a line longer than a block
    kept whole, a last line without a newline kept."""
    from data.prepare import _blocks
    lines = [b"a" * n for n in (3, 50, 7, 0, 200, 1, 30)]
    p = tmp_path / "x"
    p.write_bytes(b"\n".join(lines))  # no newline at the end
    blocks = list(_blocks(str(p), 40))
    assert b"".join(b for _, b in blocks) == p.read_bytes()
    for first, block in blocks:
        assert block.split(b"\n")[0] == lines[first - 1]
    assert all(b.endswith(b"\n") for _, b in blocks[:-1]) and [f for f, _ in blocks] == [1, 3, 6]


def test_show_sample(tmp_path, capsys):
    from data.prepare import main
    src = write_jsonl(tmp_path / "s.jsonl", [PR, SHAREGPT])
    out = prepare(src, tmp_path / "out", tokenizer="byte", chat_format="llama3", verbose=False)
    main(["--show", out, "--index", "1"])
    text = capsys.readouterr().out
    assert "[[hello<|eot_id|>]]<|start_header_id|>user" in text and "chat format llama3" in text
    mask = text.rstrip("\n").rsplit("\n", 1)[1]
    ids, m = load_dataset(out).get(1)
    assert mask == "".join(map(str, m.astype(int)))


BAD = [  # (line content, expected words in the error)
    ('{"messages": [', "malformed JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"text": "hi"}', "unknown format (keys: 'text')"),
    ('{"messages": [], "conversations": []}', "keys of two formats (messages and ShareGPT)"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}', "conversations[0].from is 'bot'; expected one of system, human, gpt"),
    ('{"conversations": [{"from": "human"}]}', "conversations[0] has no 'value'"),
    ('{"conversations": [{"from": "human", "value": "x"}]}', "no assistant turn"),
    ('{"system": "s", "conversations": [{"from": "system", "value": "t"}, {"from": "gpt", "value": "x"}]}',
     "top-level 'system' and a system turn"),
    ('{"instruction": "x", "input": ""}', "has no 'output'"),
    ('{"output": "x"}', "has no 'instruction'"),
    ('{"instruction": "x", "input": 3, "output": "y"}', "'input' must be a string"),
    ('{"prompt": "hi"}', "no 'response'"),
    ('{"prompt": "hi", "response": 3}', "'response' must be a string"),
    ('{"messages": []}', "empty conversation"),
    ('{"messages": "hi"}', "'messages' must be a list"),
    ('{"messages": [{"role": "user"}]}', "has no 'content'"),
    ('{"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}', "must be a string"),
    ('{"messages": [{"role": "asistant", "content": "x"}]}', "expected one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"prompt": "x", "response": "' + "y" * 300 + '"}', "> max_len=100"),
]


def test_default_system_prompt(tmp_path):
    """--default_system adds a system turn where a conversation has none (Qwen2.5's template does so at
    inference) and leaves a conversation's own system turn alone; sample.py renders prompts the same way."""
    src = write_jsonl(tmp_path / "sft.jsonl", [CHAT, PR])
    qwen = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    ds = load_dataset(prepare(src, tmp_path / "out", tokenizer="byte", verbose=False, default_system=qwen))
    tok = get_tokenizer("byte")
    assert tok.decode(ds.get(0)[0]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi")
    ids, mask = ds.get(1)
    assert tok.decode(ids) == (f"<|im_start|>system\n{qwen}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                               "<|im_start|>assistant\nhello<|im_end|>\n")
    assert tok.decode(ids[mask]) == "hello<|im_end|>" and ds.meta["default_system"] == qwen
    from sample import chat_prompt
    prompt = chat_prompt(tok, "hi", ds.meta["default_system"])
    assert prompt == ids[:len(prompt)].tolist() and not mask[:len(prompt)].any()  # up to the answer, exactly
    with pytest.raises(ValueError, match="default_system is empty"):
        prepare(src, tmp_path / "out2", tokenizer="byte", verbose=False, default_system=" ")
    assert not os.path.exists(tmp_path / "out2")


@pytest.mark.parametrize("line,words", BAD)
def test_bad_input_names_file_and_line(tmp_path, line, words):
    src = write_jsonl(tmp_path / "bad.jsonl", [PR, "", line, PR])  # the bad sample is on line 3
    with pytest.raises(DataError) as e:
        prepare(src, tmp_path / "out", tokenizer="byte", max_len=100, verbose=False)
    assert f"bad.jsonl:3: " in str(e.value) and words in str(e.value), str(e.value)
    assert listing(tmp_path) == ["bad.jsonl"]  # no output dir, no temp dir left behind


def test_invalid_utf8_and_empty_file(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(json.dumps(PR).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"x\.jsonl:2: not valid UTF-8"):
        prepare(str(p), tmp_path / "out", tokenizer="byte", verbose=False)
    p.write_text("\n\n")
    with pytest.raises(DataError, match="no samples"):
        prepare(str(p), tmp_path / "out", tokenizer="byte", verbose=False)
    assert listing(tmp_path) == ["x.jsonl"]


def test_existing_out_dir_never_clobbered(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [PR])
    bad = write_jsonl(tmp_path / "bad.jsonl", [PR, '{"oops"'])
    out = tmp_path / "out"
    prepare(good, out, tokenizer="byte", verbose=False)
    before = {f: (out / f).read_bytes() for f in listing(out)}
    with pytest.raises(FileExistsError):  # refused without overwrite
        prepare(good, out, tokenizer="byte", verbose=False)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):  # fails: old dir untouched
        prepare(bad, out, tokenizer="byte", overwrite=True, verbose=False)
    assert {f: (out / f).read_bytes() for f in listing(out)} == before
    write_jsonl(good, [PR, PR])
    prepare(good, out, tokenizer="byte", overwrite=True, verbose=False)  # succeeds: replaced
    assert len(load_dataset(out)) == 2
    assert listing(tmp_path) == ["bad.jsonl", "good.jsonl", "out"]


def test_overwrite_replaces_only_a_prepared_dataset(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [PR])
    notes = tmp_path / "X"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):  # any other directory
        prepare(good, notes, tokenizer="byte", overwrite=True, verbose=False)
    assert listing(notes) == ["notes.txt"]
    with pytest.raises(DataError, match="is or holds the input"):  # the input itself
        prepare(good, good, tokenizer="byte", overwrite=True, verbose=False)
    assert load_jsonl_ok(good)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(FileExistsError, match="not a directory"):  # a file
        prepare(good, afile, tokenizer="byte", overwrite=True, verbose=False)
    assert afile.read_text() == "mine"
    out = tmp_path / "out"
    prepare(good, out, tokenizer="byte", verbose=False)
    inside = write_jsonl(out / "in.jsonl", [PR])  # a dataset that holds the input (and a foreign file)
    with pytest.raises(DataError, match="is or holds the input"):
        prepare(inside, out, tokenizer="byte", overwrite=True, verbose=False)
    with pytest.raises(FileExistsError, match="also holds in.jsonl"):
        prepare(good, out, tokenizer="byte", overwrite=True, verbose=False)
    assert "in.jsonl" in listing(out)
    os.remove(inside)
    prepare(good, out, tokenizer="byte", overwrite=True, verbose=False)  # a plain prepared dataset: replaced
    assert listing(tmp_path) == ["X", "afile", "good.jsonl", "out"]  # no temp dirs left
    # the command line: a one-line error and the input intact
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "prepare.py"), "--input", good, "--out_dir", good,
                        "--tokenizer", "byte", "--overwrite"], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "Traceback" not in r.stderr, r.stderr
    assert load_jsonl_ok(good)


def load_jsonl_ok(path):
    return os.path.isfile(path) and json.loads(open(path).readline()) == PR


def test_stale_temps_removed_live_ones_kept(tmp_path):
    """Temps are named .NAME.KIND.HOST.PID.*: the next run removes those of dead processes on this host,
    and puts back a dataset that a killed overwrite had moved aside."""
    from data.prepare import _temp_prefix
    good = write_jsonl(tmp_path / "good.jsonl", [PR])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process (pids are not reused this fast)
    out = tmp_path / "out"
    mine = _temp_prefix(str(out), "tmp")
    stale = tmp_path / (mine.replace(f".{os.getpid()}.", f".{dead.pid}.") + "x")
    stale.mkdir()
    (stale / "tokens.bin").write_bytes(b"0" * 1000)
    live = tmp_path / (mine + "y")  # this test's own pid: alive
    live.mkdir()
    other_host = tmp_path / f".out.tmp.otherhost.{dead.pid}.z"
    other_host.mkdir()
    old = tmp_path / (_temp_prefix(str(out), "old").replace(f".{os.getpid()}.", f".{dead.pid}.") + "w")
    prepare(good, old / "d", tokenizer="byte", verbose=False)  # a dataset moved aside by a killed overwrite
    prepare(good, tmp_path / "other", tokenizer="byte", verbose=False)  # not our name: never touched
    with pytest.raises(FileExistsError):  # the restored dataset is there again, so no overwrite: refused
        prepare(good, out, tokenizer="byte", verbose=False)
    assert load_dataset(out).meta["n_seqs"] == 1
    assert not stale.exists() and not old.exists()
    assert live.exists() and other_host.exists()


def test_sigterm_cleans_up(tmp_path):
    """`kill` (SIGTERM) of a running prepare.py removes its temp dir."""
    import signal
    import time
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        row = json.dumps({"prompt": "q" * 200, "response": "a" * 800}) + "\n"
        f.write(row * 20000)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "data", "prepare.py"), "--input", str(src),
                          "--out_dir", str(tmp_path / "out"), "--tokenizer", "byte"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(".tmp." in n for n in os.listdir(tmp_path)) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "prepare.py finished before it could be interrupted"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "interrupted" in err, err
    assert listing(tmp_path) == ["big.jsonl"]


def test_truncate_policy(tmp_path):
    long_answer = {"prompt": "q", "response": "a" * 200}
    long_prompt = {"prompt": "q" * 200, "response": "a"}
    src = write_jsonl(tmp_path / "s.jsonl", [PR, long_answer, long_prompt])
    out = prepare(src, tmp_path / "out", tokenizer="byte", max_len=64, overlong="truncate", verbose=False)
    ds = load_dataset(out)
    # the long answer is cut to 64 tokens; the long prompt leaves no assistant token and is skipped
    assert len(ds) == 2 and ds.lengths.tolist()[1] == 64
    assert ds.meta["n_truncated"] == 2 and ds.meta["n_skipped"] == 1
    ids, mask = ds.get(1)
    full_ids, full_mask = encode_chat(get_tokenizer("byte"), [("user", "q"), ("assistant", "a" * 200)])
    assert ids.tolist() == full_ids[:64] and mask.tolist() == [bool(x) for x in full_mask[:64]]
    assert ds.lengths.max() <= 64


def test_load_dataset_detects_damage(tmp_path):
    out = prepare(write_jsonl(tmp_path / "s.jsonl", [PR, CHAT]), tmp_path / "out", tokenizer="byte", verbose=False)
    tokens = (tmp_path / "out" / "tokens.bin").read_bytes()
    (tmp_path / "out" / "tokens.bin").write_bytes(tokens[:-4])
    with pytest.raises(DataError, match="tokens.bin.*meta.json says"):
        load_dataset(out)
    os.remove(tmp_path / "out" / "meta.json")
    with pytest.raises(DataError, match="missing meta.json"):
        load_dataset(out)
    with pytest.raises(DataError, match="no such prepared dataset"):
        load_dataset(tmp_path / "nope")


def test_cl100k_offline(tmp_path):
    tok = get_tokenizer("cl100k_base")
    assert tok.encode("hello world") == [15339, 1917]  # the real cl100k_base ranks
    assert (tok.im_start_id, tok.im_end_id, tok.pad_id, tok.vocab_size) == (100277, 100278, 100257, 100280)
    assert tok.encode("<|im_end|>") != [tok.im_end_id]  # text in a message never becomes a special token
    src = write_jsonl(tmp_path / "s.jsonl", [CHAT])
    ds = load_dataset(prepare(src, tmp_path / "out", verbose=False))
    ids, mask = ds.get(0)
    assert ds.meta["tokenizer"] == "cl100k_base" and ds.meta["max_token_id"] == 100278
    assert tok.decode(ids[mask]) == "hello<|im_end|>4<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_checkpoint_dir_tokenizer(tmp_path):
    """A Qwen-style checkpoint dir: tokenizer.json (byte-level BPE with ChatML specials) + config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    t.train_from_iterator(["hello world, be brief", "2+2? 4 hi there"] * 10,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    t.save(str(ckpt / "tokenizer.json"))
    (ckpt / "config.json").write_text(json.dumps({"vocab_size": 320}))
    ds = load_dataset(prepare(write_jsonl(tmp_path / "s.jsonl", [CHAT]), tmp_path / "out",
                              tokenizer=str(ckpt), verbose=False))
    tok = get_tokenizer(str(ckpt))
    assert (tok.pad_id, tok.im_start_id, tok.im_end_id, ds.meta["vocab_size"]) == (0, 1, 2, 320)
    ids, mask = ds.get(0)
    assert ids[0] == 1 and tok.decode(ids[mask]) == "hello<|im_end|>4<|im_end|>"
    assert tok.encode("<|im_end|>") != [2]


def test_cli_error_exit(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [PR, PR, '{"prompt": "x"'])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "prepare.py"), "--input", src,
                        "--out_dir", str(tmp_path / "out"), "--tokenizer", "byte"], capture_output=True, text=True)
    assert r.returncode != 0 and "bad.jsonl:3: malformed JSON" in r.stderr, r.stderr
    assert listing(tmp_path) == ["bad.jsonl"]

# -----------------------------------------------------------------------------
# synthetic


def test_table1_matches_paper():
    assert THRESHOLDS == (1024, 4096, 8192, 32768, 131072)
    assert TABLE1["wikipedia"]["cdf"] == (0.8788, 0.9934, 0.9992, 0.9999, 1.0)
    assert TABLE1["lmsys"]["cdf"] == (0.8712, 0.9935, 0.9987, 0.9998, 0.9999)
    assert TABLE1["chatqa2"]["cdf"] == (0.2192, 0.3148, 0.4043, 0.9986, 1.0)
    assert [TABLE1[d]["longest"] // 1024 for d in ("wikipedia", "lmsys", "chatqa2")] == [78, 1643, 99]


@pytest.mark.parametrize("dist", list(TABLE1))
def test_sample_lengths_follow_cdf(dist):
    n, t = 200_000, TABLE1[dist]
    raw = sample_lengths(dist, n, np.random.default_rng(1))
    assert raw.min() >= 64 and raw.max() < t["longest"]
    for thr, c in zip(THRESHOLDS, t["cdf"]):
        assert abs(np.mean(raw < thr) - c) < 0.004, (thr, np.mean(raw < thr), c)
    # scaled: the same CDF at the scaled thresholds (min_len=1 so that nothing is clamped)
    max_len = 65536
    s = sample_lengths(dist, n, np.random.default_rng(2), max_len=max_len, min_len=1)
    scale = max_len / scale_ref(dist)
    assert s.max() <= max_len and s.min() >= 1
    for thr, c in zip(THRESHOLDS, t["cdf"]):
        assert abs(np.mean(s < thr * scale) - c) < 0.004, (thr, np.mean(s < thr * scale), c)
    # default clamp: [MIN_LEN, max_len], and lengths above the clamp are untouched
    small = sample_lengths(dist, n, np.random.default_rng(2), max_len=4096)
    assert small.min() == MIN_LEN and small.max() <= 4096
    ref = np.floor(sample_lengths(dist, n, np.random.default_rng(2), max_len=max_len, min_len=1) * 4096 / max_len)
    above = ref >= MIN_LEN
    assert np.abs(small[above] - ref[above]).max() <= 1  # same draw, rounding only
    with pytest.raises(ValueError, match="unknown distribution"):
        sample_lengths("c4", 10, np.random.default_rng(0))


def test_make_synthetic_exact_lengths_and_deterministic(tmp_path):
    kw = dict(dist="chatqa2", n=300, max_len=2048, seed=3, verbose=False)
    a = make_synthetic(tmp_path / "a", **kw)
    b = make_synthetic(tmp_path / "b", **kw)
    ds = load_dataset(a)
    want = sample_lengths("chatqa2", 300, np.random.default_rng(3), max_len=2048)
    assert ds.lengths.tolist() == want.tolist()  # every sample hits its sampled length exactly
    for f in ("tokens.bin", "mask.bin", "offsets.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert make_synthetic(tmp_path / "a", **kw) == a  # same parameters: reused
    with pytest.raises(FileExistsError):
        make_synthetic(tmp_path / "a", **{**kw, "seed": 4})
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # the temp JSONL is gone
    # the samples are well-formed tasks: long = retrieval (the answer is in the context), short = reverse/upper
    tok = get_tokenizer("byte")
    kinds = set()
    for i in range(len(ds)):
        ids, mask = ds.get(i)
        text, answer = tok.decode(ids), tok.decode(ids[mask])
        assert answer.endswith("<|im_end|>")
        answer = answer[: -len("<|im_end|>")]
        question = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        if question.startswith("Records:"):
            key = question.rsplit("What is the value of ", 1)[1].rstrip("?")
            assert f"\n{key}: {answer}" in question and len(answer) == 5 and answer.isdigit()
            kinds.add("kv")
        else:
            task, s = question.split(maxsplit=1)
            assert answer == (s[::-1] if task.startswith("reverse") else s.upper())
            kinds.add(task.rstrip(":"))
    assert kinds == {"kv", "reverse", "upper"}


def test_synthetic_script_and_speed(tmp_path):
    """Run as a script (sys.path handling), 2000 samples at max_len 4096 in a few seconds."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "synthetic.py"), "--dist", "chatqa2",
                        "--n", "2000", "--max_len", "4096", "--out_dir", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ChatQA2-Long-SFT" in r.stdout and len(load_dataset(tmp_path / "s")) == 2000
    import time
    t0 = time.perf_counter()
    make_synthetic(tmp_path / "w", dist="wikipedia", n=2000, max_len=4096, verbose=False)
    assert time.perf_counter() - t0 < 10
