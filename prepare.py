"""
Prepare TinyStories for training: GPT-2 BPE tokens (tiktoken) as flat uint16 streams.

    python prepare.py                                   # download roneneldan/TinyStories from the HF hub
    python prepare.py --input train.txt valid.txt       # local files: .txt .jsonl .json .parquet
    python prepare.py --instruct [--input FILE ...]     # SFT data: TinyStoriesInstruct, or made from stories

Writes <out_dir>/train.bin and val.bin (read with np.memmap(path, dtype=np.uint16, mode='r')), every story
then <|endoftext|> (id 50256); with --instruct each after its prompt (rl.py's words task), and a uint8 per
token in {train,val}.mask.bin (1: the story and its end-of-text, which carry the loss); meta.json last. Each
is renamed into place once complete: no crash or bad input leaves a half-written file that looks whole. In
.txt files, stories are split at lines that are exactly <|endoftext|> if any (the hub's), else at blank lines.
"""
import argparse
import functools
import itertools
import json
import os
import re
import signal
import sys
from contextlib import nullcontext
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

HF_DATASET = "roneneldan/TinyStories"
CHUNK = 1024  # stories per worker task: amortizes inter-process overhead, keeps the bar moving
VAL_TOKENS = 64 * 512  # a held-out val split holds a batch of config/tinystories_16x4.py (train.py needs one)
MIN_TOKENS = 8 * 64  # and leaves no split smaller than a batch of config/tinystories_debug.py
_enc = None  # the GPT-2 encoding, set in the parent by load (a spawned worker loads its own)


class PrepareError(Exception):
    """Bad input or environment: main() prints it as one line on stderr and exits 1."""


def read_txt(path, text=None):  # (text: the hub's TinyStoriesInstruct, as one text of lines)
    text = Path(path).read_text(encoding="utf-8-sig") if text is None else text
    eot = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*$", re.M)  # with these, blank lines are paragraphs
    return eot.split(text) if eot.search(text) else re.split(r"\n\s*\n", text)


def get_text(obj, where):
    if not isinstance(obj, dict) or "text" not in obj:
        raise PrepareError(f"{where}: expected an object with a 'text' field")
    if not isinstance(obj["text"], str):
        raise PrepareError(f"{where}: 'text' is {type(obj['text']).__name__}, not a string")
    return obj["text"]


def parse_json(text, path, lineno=1):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path}:{lineno + e.lineno - 1}: invalid JSON ({e.msg})")


def read_jsonl(path):
    with open(path, encoding="utf-8-sig") as f:  # line by line: no second copy of a big file
        return [get_text(parse_json(s, path, n), f"{path}:{n}") for n, s in enumerate(f, 1) if s.strip()]


def read_json(path):
    data = parse_json(Path(path).read_text(encoding="utf-8-sig"), path)
    if not isinstance(data, list):
        raise PrepareError(f"{path}: expected a JSON list of objects with a 'text' field")
    return [get_text(obj, f"{path}: item {i}") for i, obj in enumerate(data)]


def read_parquet(path):
    import pyarrow.parquet as pq  # only this format needs it
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises many types; all mean "not a usable parquet file"
        raise PrepareError(f"{path}: cannot read as parquet ({e})")
    if "text" not in table.column_names:
        raise PrepareError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
    return [get_text({"text": t}, f"{path}: row {i}") for i, t in enumerate(table.column("text").to_pylist())]


def read_stories(path):
    if not os.path.isfile(path):
        raise PrepareError(f"{path}: {'not a regular file' if os.path.exists(path) else 'no such file'}")
    ext = os.path.splitext(path)[1].lower()
    readers = {".txt": read_txt, ".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet}
    if ext not in readers:
        raise PrepareError(f"{path}: unknown extension '{ext}' (expected {', '.join(readers)})")
    if os.path.getsize(path) > 2**27:  # reading takes a while: say what we are doing
        print(f"reading {path} ({os.path.getsize(path) / 2**30:.1f} GiB)", file=sys.stderr)
    try:
        texts = readers[ext](path)
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e.strerror or e})")
    if not any(t.strip() for t in texts):  # (tokenize skips the empty ones)
        raise PrepareError(f"{path}: no stories in this file")
    return texts


def is_val_file(path):  # whole word only, so 'interval.txt' or 'evaluation.txt' stay training data
    return re.search(r"(?<![a-z])val(id|idation)?(?![a-z])", os.path.basename(path).lower()) is not None


def load(args):
    """Returns the train and val stories (a list, or a hub split; no val: hold_out makes it), meta fields."""
    global _enc
    if not args.input:
        _enc = load_encoding()  # before the download: no point fetching 2 GB we cannot tokenize
        name = HF_DATASET + "Instruct" * args.instruct
        try:
            import datasets
            import huggingface_hub
            for lib in (datasets, huggingface_hub):  # their retry warnings would bury our one-line error
                lib.logging.set_verbosity_error()  # (download progress bars still show)
            ds = datasets.load_dataset(name)
        except Exception as e:
            raise PrepareError(f"could not get {name} from the Hugging Face hub ({type(e).__name__}: "
                               f"{e}); use local files with --input FILE [FILE ...], or set "
                               f"HF_DATASETS_OFFLINE=1 to use a local Hugging Face cache")
        info = {"source": f"huggingface:{name}", "val_from": "hub validation split"}
        if args.instruct:  # a row per line: join them, a record ends at an <|endoftext|> line
            ds = {s: read_txt(None, "\n".join(ds[s]["text"])) for s in ("train", "validation")}
        return {"train": ds["train"], "val": ds["validation"]}, info
    val_files = args.val_input or [p for p in args.input if is_val_file(p)]
    train_files = args.input if args.val_input else [p for p in args.input if not is_val_file(p)]
    if not train_files:
        raise PrepareError("no training input: every --input file is named like validation data")
    if set(map(os.path.realpath, train_files)) & set(map(os.path.realpath, val_files)):
        raise PrepareError("a file is both training and validation data (its val loss would be a train loss)")
    splits = {"train": [s for p in train_files for s in read_stories(p)],
              "val": [s for p in val_files for s in read_stories(p)]}
    _enc = load_encoding()  # only now: every file is read before anything is tokenized (a bad one fails fast)
    return splits, {"source": "local files", "train_files": train_files, "val_files": val_files,
                    "val_from": "validation files"}


def load_encoding():  # tiktoken's GPT-2 encoding, for prepare.py, sample.py and export.py
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network on first use, a broken cache, no tiktoken
        raise PrepareError(f"cannot load tiktoken's GPT-2 encoding ({type(e).__name__}); it is downloaded on "
                           "first use, so connect to the internet or set TIKTOKEN_CACHE_DIR to a folder "
                           "holding its cached files") from None


def tokenize(texts, instruct=False):
    """Token ids of each story (after its prompt, with instruct) and <|endoftext|>; the loss mask; lengths."""
    enc = _enc or load_encoding()  # None in a (spawned) worker: tiktoken caches it
    if instruct:
        from rl import to_example
    pairs = filter(None, (to_example(t) if instruct else ("", t) for t in map(str.strip, texts) if t))
    encode = lambda t: enc.encode_ordinary(t) if t else []  # noqa: E731 (a story's "<|endoftext|>" is text)
    parts = [(encode(p), encode(s) + [enc.eot_token]) for p, s in pairs]
    mask = itertools.chain(*([0] * len(p) + [1] * len(s) for p, s in parts))
    ids = np.fromiter(itertools.chain(*(p + s for p, s in parts)), np.int64)
    return ids, np.fromiter(mask, np.uint8), [len(p) + len(s) for p, s in parts]


def write_split(tmp, split, stories, pool):
    """Tokenizes stories into tmp's split.bin (and .mask.bin), a slice at a time (the hub's are ~2 GB)."""
    chunks = (stories[i:i + CHUNK] if isinstance(stories, list) else stories[i:i + CHUNK]["text"]
              for i in range(0, len(stories), CHUNK))
    lengths, work = [], functools.partial(tokenize, instruct=split + ".mask.bin" in tmp)
    with open(tmp[split + ".bin"], "wb") as f, open(tmp.get(split + ".mask.bin", os.devnull), "wb") as fm, \
            tqdm(total=len(stories), desc=split, unit=" stories", disable=None) as bar:
        # hand the pool a bounded batch at a time: Pool.imap would read the whole input into its queue
        while batch := list(itertools.islice(chunks, 64)):
            for texts, (ids, mask, n) in zip(batch, pool.imap(work, batch) if pool else map(work, batch)):
                if len(ids) and ids.max() > 65535:
                    raise PrepareError(f"token id {ids.max()} does not fit in uint16 (max 65535); "
                                       f"this tokenizer needs a wider dtype")
                f.write(ids.astype(np.uint16).tobytes())
                fm.write(mask.tobytes())
                lengths += n
                bar.update(len(texts))
    return np.array(lengths, dtype=np.int64)


def hold_out(tmp, lengths, fraction):
    """Moves the last training stories, in tmp's files and in lengths (stories' tokens by split), into the val
    split: `fraction` of them or VAL_TOKENS tokens, whichever is more, but at most half the tokens."""
    tail = np.cumsum(lengths["train"][::-1])  # tokens in the last 1, 2, 3, ... stories
    total, want = int(tail[-1]), min(VAL_TOKENS, int(tail[-1]) // 2)
    k = max(1, round(len(tail) * fraction), int(np.searchsorted(tail, want)) + 1)
    n_train = total - int(tail[k - 1])
    if min(n_train, total - n_train) < MIN_TOKENS:
        raise PrepareError(f"{len(tail):,} training stories of {total:,} tokens: too few to hold out a "
                           f"val split and keep {MIN_TOKENS} tokens in each (one batch of config/tinystories_"
                           f"debug.py); give more stories, or a validation file with --val_input")
    for ext, size in ((".bin", 2), (".mask.bin", 1))[:1 + ("val.mask.bin" in tmp)]:  # (bytes per token)
        np.fromfile(tmp["train" + ext], np.uint8, offset=size * n_train).tofile(tmp["val" + ext])
        os.truncate(tmp["train" + ext], size * n_train)
    lengths["train"], lengths["val"] = lengths["train"][:-k], lengths["train"][-k:]
    return f"the last {k:,} training stories (the more of val_fraction={fraction:g} and {want:,} tokens)"


def write_all(args, tmp):
    """Tokenizes the data into tmp's files, meta.json last; returns what meta.json says."""
    splits, info = load(args)
    # a pool pays off past one chunk; its workers ignore Ctrl-C (dying of it, they would hang the parent) and
    # are spawned: a child forked from a process with threads (tqdm's, torch's) can deadlock on a copied lock
    use_pool = args.num_proc > 1 and max(map(len, splits.values())) > CHUNK
    spawn, no_int = get_context("spawn"), (signal.SIGINT, signal.SIG_IGN)
    with spawn.Pool(args.num_proc, signal.signal, no_int) if use_pool else nullcontext() as pool:
        lengths = {split: write_split(tmp, split, xs, pool) for split, xs in splits.items() if len(xs)}
    if "val" not in lengths:
        info["val_from"] = hold_out(tmp, lengths, args.val_fraction)
    counts = {f"{split}_{what}": int(count(ls)) for what, count in (("tokens", np.sum), ("stories", len))
              for split, ls in lengths.items()}
    meta = dict(tokenizer=_enc.name, vocab_size=_enc.n_vocab, eot_token=_enc.eot_token, dtype="uint16",
                instruct=args.instruct, **counts, **info)  # instruct: train.py needs the loss masks
    Path(tmp["meta.json"]).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def parse_args(argv):
    p = argparse.ArgumentParser(description="TinyStories as GPT-2 BPE tokens: train.bin, val.bin, meta.json.")
    p.error = lambda msg: p.exit(2, f"error: {msg} (see python prepare.py --help)\n")  # one line: no usage
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="local .txt/.jsonl/.json/.parquet files instead of the hub; names containing "
                        "val/valid/validation are validation data")
    p.add_argument("--val_input", nargs="+", metavar="PATH",
                   help="validation files, named explicitly (then every --input file is training data)")
    p.add_argument("--val_fraction", type=float, default=0.01,
                   help=f"no validation file: hold out this fraction of the last training stories or "
                        f"{VAL_TOKENS} tokens, whichever is more, but at most half (default 0.01)")
    p.add_argument("--instruct", action="store_true", help="SFT data for rl.py's words task, with loss masks")
    p.add_argument("--out_dir", help="default data/tinystories (--instruct: data/tinystories_instruct)")
    p.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokenizer processes (default min(8, cpu count))")
    args = p.parse_args(argv)
    if args.val_input and not args.input:
        p.error("--val_input needs --input for the training data")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.num_proc < 1:
        p.error(f"--num_proc must be at least 1, got {args.num_proc}")
    args.out_dir = args.out_dir or os.path.join("data", "tinystories" + "_instruct" * args.instruct)
    return args


def main(argv=None):
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code
    names = ["train.bin", "val.bin"] + ["train.mask.bin", "val.mask.bin"] * args.instruct + ["meta.json"]
    out = {name: os.path.join(args.out_dir, name) for name in names}
    tmp = {name: f"{path}.{os.getpid()}.tmp" for name, path in out.items()}  # two runs never share one
    folder = Path(os.path.abspath(args.out_dir))
    made = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]  # a failed run removes them again
    try:
        os.makedirs(args.out_dir, exist_ok=True)  # and a first file in it, before reading or downloading
        open(tmp["train.bin"], "wb").close()
        meta = write_all(args, tmp)
        old = [f"{split} {os.path.getsize(out[split + '.bin']) // 2:,} tokens" for split in ("train", "val")
               if os.path.isfile(out[split + ".bin"])]
        if old:
            print(f"replacing {args.out_dir} ({', '.join(old)})", file=sys.stderr)
        Path(out["meta.json"]).unlink(missing_ok=True)  # it marks a complete set: the new one goes in last
        for name in names:
            os.replace(tmp[name], out[name])
        made = []
    except PrepareError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message held
        return 1
    except OSError as e:  # out_dir is a file, or read-only, or the disk is full, ...
        why = "a file, not a folder" if isinstance(e, FileExistsError) else e.strerror or e
        print(f"error: cannot write to {args.out_dir} ({why})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        for path in filter(os.path.exists, tmp.values()):
            os.remove(path)
        for folder in filter(os.path.isdir, made):  # innermost first; empty: we wrote nothing else there
            os.rmdir(folder)

    for split in ("train", "val"):
        print(f"{split + ':':6s} {meta[split + '_stories']:,} stories, {meta[split + '_tokens']:,} tokens "
              f"-> {out[split + '.bin']}")
    print(f"       from {meta['val_from']}\nmeta:  {out['meta.json']}")
    return 0


if __name__ == "__main__":
    code = 1  # unless main returns: our output's reader stopped early (| head) while we were working
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the rest of our output is not wanted: keep the exit's flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)
