"""sample.py: KV-cache decoding against recomputing the whole sequence and against transformers'
generate; prompts in the data's chat format; the synthetic answer checker; one-line errors for bad input."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import LLAMA3_SPECIALS, ROOT, tokenizer_dir
from data.synthetic import TASKS, make_sample, solve
from model import KVCache, ModelConfig, Transformer
from sample import generate

transformers = pytest.importorskip("transformers")


def random_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=176))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # sharper logits, so greedy ties cannot hide a bug
    return model.eval()


def test_kv_cache_matches_full_recompute_and_transformers(tmp_path):
    model = random_model()
    prompt = torch.randint(0, 300, (11,)).tolist()
    ours = generate(model, prompt, 24, temperature=0)
    ids = list(prompt)  # no cache: the whole sequence through the model for every new token
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert ours == ids[len(prompt):]
    # cached prefill + one step gives the logits of the uncached pass, position by position
    cache = KVCache(model.config.n_layer, 40)
    with torch.no_grad():
        full = model(torch.tensor([ids[:13]]))[0][0]
        a = model(torch.tensor([ids[:12]]), attn_fn=cache)[0][0]
        b = model(torch.tensor([ids[12:13]]), position_ids=torch.tensor([12]), attn_fn=cache)[0][0]
    torch.testing.assert_close(torch.cat([a, b]), full, atol=2e-5, rtol=1e-4)
    assert cache.length == 13

    model.save_pretrained(tmp_path)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 11, dtype=torch.long), max_new_tokens=24,
                      min_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, 11:].tolist()


def test_sampling_is_seeded_and_top_k_restricts():
    model = random_model()
    prompt = [1, 2, 3]
    a = generate(model, prompt, 16, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    b = generate(model, prompt, 16, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert a == b
    with torch.no_grad():  # each sampled token is among the 3 most likely after its prefix
        for t in range(len(a)):
            logits = model(torch.tensor([prompt + a[:t]]))[0][0, -1]
            assert a[t] in torch.topk(logits, 3).indices.tolist()
    eos = a[0]
    assert generate(model, prompt, 16, temperature=1.0, top_k=3, eos_id=eos,
                    generator=torch.Generator().manual_seed(0)) == [eos]  # stops at eos


def test_prompt_in_the_chat_format(tmp_path, capsys):
    """A directory with a Llama 3 tokenizer gets Llama 3 prompts and stops at <|eot_id|>; --chat_format
    overrides the format (here for the byte tokenizer, which has both formats' tokens)."""
    import sample
    from data.prepare import get_chat_format, get_tokenizer
    model = random_model()
    model.save_pretrained(tmp_path / "hf")
    tokenizer_dir(tmp_path / "llama", LLAMA3_SPECIALS, vocab_size=296)  # rounded up to 296 <= the model's 300
    (tmp_path / "hf" / "tokenizer.json").write_bytes((tmp_path / "llama" / "tokenizer.json").read_bytes())
    cases = (([], str(tmp_path / "hf"), "llama3"), (["--tokenizer=byte", "--chat_format=llama3"], "byte", "llama3"),
             (["--tokenizer=byte"], "byte", "chatml"))
    for extra, tokenizer, fmt in cases:
        sample.main(["--hf_dir", str(tmp_path / "hf"), "hi there", "--max_new_tokens=6", "--temperature=0", *extra])
        tok = get_tokenizer(tokenizer)
        chat = get_chat_format(tok, fmt)
        ids = sample.chat_prompt(tok, "hi there", None, fmt)
        assert ids[0] == chat.tok.specials["<|begin_of_text|>" if fmt == "llama3" else "<|im_start|>"]
        new = generate(model, ids, 6, temperature=0, eos_id=chat.eos_id)
        assert capsys.readouterr().out == tok.decode([t for t in new if t != chat.eos_id]) + "\n", (extra, fmt)


def test_solve_recomputes_every_synthetic_answer():
    rng = np.random.default_rng(0)
    seen = set()
    for L in list(range(32, 300)) + [700, 3000]:
        user, assistant = (m["content"] for m in make_sample(L, rng)["messages"])
        task, answer = solve(user)
        assert answer == assistant, (L, task)
        seen.add(task)
    assert seen == set(TASKS)
    for bad in ("reverse", "hello world", "Records:\nab: 1\nWhat is the value of zz?"):
        with pytest.raises(ValueError):
            solve(bad)


def run_sample(*args):
    r = subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, capsys):
    import sample
    random_model().save_pretrained(tmp_path / "hf")  # vocab 300: the byte tokenizer (264) fits, cl100k does not
    cases = [
        (["--out_dir", str(tmp_path / "missing"), "hi"], "no checkpoint"),
        (["--hf_dir", str(tmp_path / "hf"), "--tokenizer=cl100k_base", "hi"], "the model's vocabulary only 300"),
        (["--hf_dir", str(tmp_path / "hf"), "--tokenizer=byte", "  "], "empty prompt"),
        (["--hf_dir", str(tmp_path / "hf"), "hi"], "no tokenizer.json"),
        (["--hf_dir", str(tmp_path / "nowhere"), "--tokenizer=byte", "hi"], "not a directory"),
    ]
    for args, words in cases:  # in-process: main() leaves through sys.exit("error: ...")
        with pytest.raises(SystemExit) as e:
            sample.main(args)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and words in msg and "\n" not in msg, (args, msg)
    rc, out, err = run_sample("--out_dir", str(tmp_path / "missing"), "hi")  # and as a user sees it
    assert rc == 1 and err == f"error: {tmp_path / 'missing' / 'ckpt'}: no checkpoint (train with checkpoint_interval > 0 to write one)\n"
    (tmp_path / "p.txt").write_text("upper abc")
    rc, out, err = run_sample("--hf_dir", str(tmp_path / "hf"), "--tokenizer=byte", "--prompt_file", str(tmp_path / "p.txt"),
                              "--max_new_tokens=5", "--temperature=0")
    assert rc == 0, err
    from data.prepare import get_tokenizer
    from sample import chat_prompt
    tok = get_tokenizer("byte")  # the same prompt rendered and decoded in-process
    new = generate(random_model(), chat_prompt(tok, "upper abc"), 5, temperature=0, eos_id=tok.eos_id)
    assert out == tok.decode([t for t in new if t != tok.eos_id]) + "\n"
