"""
Prepare TinyStories for training: GPT-2 BPE tokens (tiktoken) as flat uint16 streams.

    python prepare.py                                   # download roneneldan/TinyStories from the HF hub
    python prepare.py --input train.txt valid.txt       # local files: .txt .jsonl .json .parquet

Writes <out_dir>/train.bin and val.bin (every story followed by <|endoftext|>, id 50256),
read them back with np.memmap(path, dtype=np.uint16, mode='r'), and meta.json last.
Every file goes to a .tmp name first and is renamed into place only when complete, so a
crash or a bad input never leaves a half-written file that looks whole.

Local .txt files: stories are separated by lines that are exactly <|endoftext|> if the file
has any (the hub's TinyStories-*.txt files), else by blank lines (then a story's paragraphs
become separate stories: the boundary is not marked, so we cannot do better).
An input file whose name has the word val/valid/validation in it is validation data;
with none, the last --val_fraction of the training stories are held out instead.
"""
import argparse
import itertools
import json
import os
import re
import sys
from contextlib import nullcontext
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

HF_DATASET = "roneneldan/TinyStories"
CHUNK = 1024  # stories per worker task: amortizes inter-process overhead, keeps the bar moving
EOT_LINE = "<|endoftext|>"
UINT16_MAX = np.iinfo(np.uint16).max


class PrepareError(Exception):
    """Bad input or environment: main() prints it as one line on stderr and exits 1."""


# -----------------------------------------------------------------------------
# reading local files: each reader returns a list of raw texts

def read_txt(path):
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    eot = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*$", re.M)
    if eot.search(text):
        return eot.split(text)  # blank lines inside a story are its paragraphs: keep them
    return re.split(r"\n\s*\n", text)


def get_text(obj, where):
    if not isinstance(obj, dict) or "text" not in obj:
        raise PrepareError(f"{where}: expected an object with a 'text' field")
    if not isinstance(obj["text"], str):
        raise PrepareError(f"{where}: 'text' is {type(obj['text']).__name__}, not a string")
    return obj["text"]


def read_jsonl(path):
    texts = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{lineno}: invalid JSON ({e.msg})")
            texts.append(get_text(obj, f"{path}:{lineno}"))
    return texts


def read_json(path):
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}:{e.lineno}: invalid JSON ({e.msg})")
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
    texts = table.column("text").to_pylist()
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise PrepareError(f"{path}: row {i}: 'text' is {type(t).__name__}, not a string")
    return texts


READERS = {".txt": read_txt, ".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet}


def read_stories(path):
    if not os.path.exists(path):
        raise PrepareError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise PrepareError(f"{path}: not a regular file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in READERS:
        raise PrepareError(f"{path}: unknown extension '{ext}' (expected {', '.join(READERS)})")
    try:
        texts = READERS[ext](path)
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e.strerror or e})")
    stories = [s for s in (t.strip() for t in texts) if s]
    if not stories:
        raise PrepareError(f"{path}: no stories in this file")
    return stories


def is_val_file(path):
    # whole word only, so 'interval.txt' or 'evaluation.txt' stay training data
    return re.search(r"(?<![a-z])val(id|idation)?(?![a-z])", os.path.basename(path).lower()) is not None


def load_local(args):
    """Returns (train stories, val stories, meta fields describing where they came from)."""
    if args.val_input:
        train_files, val_files = args.input, args.val_input
    else:
        val_files = [p for p in args.input if is_val_file(p)]
        train_files = [p for p in args.input if not is_val_file(p)]
    if not train_files:
        raise PrepareError("no training input: every --input file is named like validation data")
    # read everything before writing anything, so a bad file leaves previous outputs alone
    train = [s for p in train_files for s in read_stories(p)]
    val = [s for p in val_files for s in read_stories(p)]
    if val_files:
        val_from = "validation files"
    else:
        n_val = max(1, round(len(train) * args.val_fraction))
        if n_val >= len(train):
            raise PrepareError(f"only {len(train)} stories: too few to hold out a validation split "
                               f"(give a validation file with --val_input)")
        train, val = train[:-n_val], train[-n_val:]
        val_from = f"last {n_val} training stories (val_fraction={args.val_fraction})"
    info = {"source": "local files", "train_files": train_files, "val_files": val_files, "val_from": val_from}
    return train, val, info


def load_hub():
    try:
        import datasets
        # its retry warnings would bury our one-line error; download progress bars still show
        datasets.logging.set_verbosity_error()
        import huggingface_hub
        huggingface_hub.logging.set_verbosity_error()
        ds = datasets.load_dataset(HF_DATASET)
        return ds["train"], ds["validation"]
    except Exception as e:
        raise PrepareError(f"could not get {HF_DATASET} from the Hugging Face hub ({type(e).__name__}: {e}); "
                           f"use local files with --input FILE [FILE ...], or set HF_DATASETS_OFFLINE=1 "
                           f"to use a local Hugging Face cache")


def hub_chunks(ds):
    for i in range(0, len(ds), CHUNK):
        yield ds[i:i + CHUNK]["text"]  # slice by slice: the train split is ~2 GB of text


# -----------------------------------------------------------------------------
# tokenizing and writing

def load_encoding():
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise PrepareError(f"cannot load tiktoken's GPT-2 encoding ({type(e).__name__}); it is downloaded on "
                           f"first use, so connect to the internet or set TIKTOKEN_CACHE_DIR to a folder "
                           f"holding its cached files")


_enc = None  # the encoding, set in the parent (forked workers inherit it) or by _init_worker


def _init_worker():
    global _enc
    if _enc is None:  # spawned rather than forked
        _enc = load_encoding()


def tokenize(texts):
    """Returns (token ids of every story followed by <|endoftext|>, number of stories)."""
    ids, n = [], 0
    for text in texts:
        text = text.strip()  # local readers did this already; hub texts come raw
        if not text:
            continue
        # encode_ordinary: a literal "<|endoftext|>" inside a story is text, not the special token
        ids.extend(_enc.encode_ordinary(text))
        ids.append(_enc.eot_token)
        n += 1
    return np.array(ids, dtype=np.int64), n


def write_split(path, chunks, total, pool, desc):
    """Tokenizes chunks of stories into path as uint16; returns (stories, tokens)."""
    n_stories = n_tokens = 0
    with open(path, "wb") as f, tqdm(total=total, desc=desc, unit=" stories", disable=None) as bar:
        chunks = iter(chunks)
        # hand the pool a bounded batch at a time: Pool.imap would read the whole input into its queue
        while batch := list(itertools.islice(chunks, 64)):
            results = pool.imap(tokenize, batch) if pool else map(tokenize, batch)
            for texts, (ids, n) in zip(batch, results):
                if len(ids) and ids.max() > UINT16_MAX:
                    raise PrepareError(f"token id {ids.max()} does not fit in uint16 (max {UINT16_MAX}); "
                                       f"this tokenizer needs a wider dtype")
                f.write(ids.astype(np.uint16).tobytes())
                n_stories += n
                n_tokens += len(ids)
                bar.update(len(texts))
    return n_stories, n_tokens


def parse_args(argv):
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # argparse would print the usage too; we promise one line
            print(f"error: {message} (see python prepare.py --help)", file=sys.stderr)
            sys.exit(2)

    p = Parser(description="Tokenize TinyStories (GPT-2 BPE) into train.bin / val.bin / meta.json.")
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="local .txt/.jsonl/.json/.parquet files instead of the hub; names containing "
                        "val/valid/validation are validation data")
    p.add_argument("--val_input", nargs="+", metavar="PATH",
                   help="validation files, named explicitly (then every --input file is training data)")
    p.add_argument("--val_fraction", type=float, default=0.01,
                   help="with no validation file: hold out this fraction of training stories, the last "
                        "ones (default 0.01, at least 1 story)")
    p.add_argument("--out_dir", default=os.path.join("data", "tinystories"))
    p.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokenizer processes (default min(8, cpu count))")
    args = p.parse_args(argv)
    if args.val_input and not args.input:
        p.error("--val_input needs --input for the training data")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.num_proc < 1:
        p.error(f"--num_proc must be at least 1, got {args.num_proc}")
    return args


def main(argv=None):
    global _enc
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed
        return e.code
    out = {name: os.path.join(args.out_dir, name) for name in ("train.bin", "val.bin", "meta.json")}
    tmp = {name: path + ".tmp" for name, path in out.items()}
    try:
        if args.input:
            train, val, info = load_local(args)
            _enc = load_encoding()
            splits = {name: ([xs[i:i + CHUNK] for i in range(0, len(xs), CHUNK)], len(xs))
                      for name, xs in (("train", train), ("val", val))}
        else:
            _enc = load_encoding()  # before the download: no point fetching 2 GB we cannot tokenize
            train, val = load_hub()
            info = {"source": f"huggingface:{HF_DATASET}", "val_from": "hub validation split"}
            splits = {"train": (hub_chunks(train), len(train)), "val": (hub_chunks(val), len(val))}
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            open(tmp["train.bin"], "wb").close()  # fail now, not after tokenizing, if we cannot write
        except OSError as e:
            raise PrepareError(f"cannot write to {args.out_dir} ({e.strerror or e})")

        counts = {}
        # worker processes only pay off with more than one chunk; nullcontext() gives pool = None
        use_pool = args.num_proc > 1 and max(total for _, total in splits.values()) > CHUNK
        with Pool(args.num_proc, initializer=_init_worker) if use_pool else nullcontext() as pool:
            for split, (chunks, total) in splits.items():
                counts[split] = write_split(tmp[f"{split}.bin"], chunks, total, pool, desc=split)
        meta = {"tokenizer": _enc.name, "vocab_size": _enc.n_vocab, "eot_token": _enc.eot_token,
                "dtype": "uint16",
                "train_tokens": counts["train"][1], "val_tokens": counts["val"][1],
                "train_stories": counts["train"][0], "val_stories": counts["val"][0], **info}
        with open(tmp["meta.json"], "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        # meta.json marks a complete set: drop the old one before swapping the bins, put the new one last
        if os.path.exists(out["meta.json"]):
            os.remove(out["meta.json"])
        for name in ("train.bin", "val.bin", "meta.json"):
            os.replace(tmp[name], out[name])
    except PrepareError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message held
        return 1
    except OSError as e:  # disk full and the like, while writing
        print(f"error: writing to {args.out_dir} failed ({e.strerror or e})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)

    for split in ("train", "val"):
        n_stories, n_tokens = counts[split]
        print(f"{split + ':':6s} {n_stories:,} stories, {n_tokens:,} tokens -> {out[split + '.bin']}")
    print(f"meta:  {out['meta.json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
