"""Tests for prepare.py: every local input format round-trips, val splits, atomic writes, clean errors."""
import errno
import json
import os
import runpy
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import prepare  # noqa: E402

EOT = "<|endoftext|>"
TRAIN = [
    "Once upon a time, there was a little cat named Tom.\nTom liked milk.",
    'Lily saw a big dog. "Hi!" she said. The dog wagged its tail.',
    "Émile ate ice cream 🍦 in the sun, and it was yummy.",
]
VAL = ["The bird sang a song.", "Ben and Mia built a tall tower of blocks."]


@pytest.fixture(scope="module")
def enc():
    try:
        import tiktoken
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"tiktoken's gpt2 encoding is unavailable (no cache, no internet; "
                    f"set TIKTOKEN_CACHE_DIR): {e}")


class FakeEnc:
    """Stands in for tiktoken where a test only needs prepare's control flow; 'BOOM' gives a too-big id."""
    name, n_vocab, eot_token = "fake", 70001, 50256

    def encode_ordinary(self, text):
        return [70000] if "BOOM" in text else [len(text) % 1000]


@pytest.fixture
def fake_enc(monkeypatch):
    monkeypatch.setattr(prepare, "load_encoding", lambda: FakeEnc())
    monkeypatch.setattr(prepare, "CHUNK", 10**9)  # tokenize in-process: spawned workers load the real one


def run(capsys, *argv):
    code = prepare.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def decode(enc, path):
    return enc.decode(np.memmap(path, dtype=np.uint16, mode="r").tolist())


def joined(stories):
    return "".join(s + EOT for s in stories)


def write(path, fmt, stories):
    if fmt == "txt_blank":
        path.write_text("\n\n  \n".join(stories) + "\n\n")
    elif fmt == "txt_eot":
        path.write_text("".join(s + "\n" + EOT + "\n" for s in stories))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"id": i, "text": s}) for i, s in enumerate(stories)) + "\n\n")
    elif fmt == "json":
        path.write_text(json.dumps([{"text": s} for s in stories], indent=1))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": stories}), path)
    return path


EXT = {"txt_blank": ".txt", "txt_eot": ".txt", "jsonl": ".jsonl", "json": ".json", "parquet": ".parquet"}


def check_output(enc, out, train, val):
    assert decode(enc, out / "train.bin") == joined(train)
    assert decode(enc, out / "val.bin") == joined(val)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert meta["eot_token"] == 50256 and meta["dtype"] == "uint16"
    assert meta["train_stories"] == len(train) and meta["val_stories"] == len(val)
    assert meta["train_tokens"] == os.path.getsize(out / "train.bin") // 2
    assert meta["val_tokens"] == os.path.getsize(out / "val.bin") // 2
    assert not list(out.glob("*.tmp"))
    return meta


# -----------------------------------------------------------------------------
# formats and splits

@pytest.mark.parametrize("fmt", list(EXT))
def test_formats_round_trip(tmp_path, capsys, enc, fmt):
    # paragraphs need EOT lines
    train = TRAIN + ["Mom said:\n\nit is time for bed."] if fmt != "txt_blank" else TRAIN
    t = write(tmp_path / f"stories-train{EXT[fmt]}", fmt, train)
    v = write(tmp_path / f"stories-valid{EXT[fmt]}", fmt, VAL)
    code, out, err = run(capsys, "--input", t, v, "--out_dir", tmp_path / "out", "--num_proc", 1)
    assert code == 0, err
    assert err == ""
    meta = check_output(enc, tmp_path / "out", train, VAL)
    assert meta["val_files"] == [str(v)] and meta["train_files"] == [str(t)]
    assert "train.bin" in out and "val.bin" in out


def test_stories_are_stripped_and_empty_ones_dropped(tmp_path, capsys, enc):
    t = tmp_path / "a.jsonl"
    t.write_text("\n".join(json.dumps({"text": s}) for s in ["  Hello there.\n", "   ", "", "Bye now. "]))
    v = write(tmp_path / "val.txt", "txt_eot", ["\n\nThe end.\n", "  "])
    assert run(capsys, "--input", t, v, "--out_dir", tmp_path)[0] == 0
    check_output(enc, tmp_path, ["Hello there.", "Bye now."], ["The end."])


def test_literal_endoftext_inside_a_story_is_plain_text(tmp_path, capsys, enc):
    story = "He typed <|endoftext|> in the middle of a line."
    t = write(tmp_path / "a.jsonl", "jsonl", [story, "Two."])
    assert run(capsys, "--input", t, "--val_input", write(tmp_path / "b.jsonl", "jsonl", ["x"]),
               "--out_dir", tmp_path)[0] == 0
    ids = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    assert (ids == 50256).sum() == 2  # only the two appended separators are the special token


@pytest.mark.parametrize("n, frac, n_val", [
    (100, None, 20),   # VAL_TOKENS (40 here; every story is 2 tokens) beats 1% of the stories
    (100, 0.3, 30),    # --val_fraction beats VAL_TOKENS
    (3000, None, 30),  # 1% of the stories beats VAL_TOKENS
    (30, None, 15),    # at most half the tokens
    (8, None, None)])  # half is 8 tokens, under MIN_TOKENS (10 here): refused
def test_hold_out_rule(tmp_path, capsys, fake_enc, monkeypatch, n, frac, n_val):
    monkeypatch.setattr(prepare, "VAL_TOKENS", 40)
    monkeypatch.setattr(prepare, "MIN_TOKENS", 10)
    stories = [f"Story {'number ' * (i % 7)}{i}." for i in range(n)]
    t = write(tmp_path / "all.txt", "txt_blank", stories)
    extra = ["--val_fraction", frac] if frac else []
    code, out, err = run(capsys, "--input", t, "--out_dir", tmp_path / "o", *extra)
    if n_val is None:
        assert code == 1 and err == (
            f"error: {n} training stories of {2 * n} tokens: too few to hold out a val split and keep 10 "
            "tokens in each (one batch of config/tinystories_debug.py); give more stories, or a validation "
            "file with --val_input\n")
        assert not (tmp_path / "o").exists()
        return
    assert code == 0, err

    def ids(xs):
        return [t for s in xs for t in (len(s) % 1000, 50256)]
    assert np.fromfile(tmp_path / "o" / "train.bin", np.uint16).tolist() == ids(stories[:-n_val])
    assert np.fromfile(tmp_path / "o" / "val.bin", np.uint16).tolist() == ids(stories[-n_val:])
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert (meta["train_stories"], meta["val_stories"], meta["val_tokens"]) == (n - n_val, n_val, 2 * n_val)
    assert meta["val_files"] == [] and meta["val_from"].startswith(f"the last {n_val:,} training stories")
    assert f"from the last {n_val:,} training stories" in out


def test_hold_out_constants_are_the_shipped_configs_batches():
    batches = {p.name: (c["batch_size"] * c["block_size"])
               for p in (REPO / "config").glob("*.py") for c in [runpy.run_path(str(p))] if "batch_size" in c}
    assert prepare.VAL_TOKENS == max(batches.values()) == batches["tinystories_16x4.py"]
    assert 512 == min(batches.values()) == batches["tinystories_debug.py"]


@pytest.mark.parametrize("n_stories", [300, 2000])
def test_one_file_gives_splits_the_shipped_configs_can_use(tmp_path, enc, n_stories):
    """Issue #14: `python prepare.py --input one_file.txt` held out 1% of the stories, a val split smaller
    than one batch of any config we ship, so train.py refused it."""
    names, things = ["Tom", "Lily", "Ben", "Mia", "Sam"], ["ball", "cat", "tree", "boat", "cake", "kite"]
    stories = [f"Once upon a time, {names[i % 5]} found a {things[i % 6]} {i} in the park. "
               f"{names[(i + 1) % 5]} said: \"It is big and red!\" They played all day, and at night they "
               f"went home happy." for i in range(n_stories)]
    (tmp_path / "one_file.txt").write_text("\n\n".join(stories) + "\n")
    p = subprocess.run([sys.executable, str(REPO / "prepare.py"), "--input", "one_file.txt"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    data = tmp_path / "data" / "tinystories"
    n = {split: os.path.getsize(data / f"{split}.bin") // 2 for split in ("train", "val")}
    total = sum(enc.encode_ordinary(s).__len__() + 1 for s in stories)
    assert n["train"] + n["val"] == total
    for cfg in (REPO / "config").glob("*.py"):
        c = runpy.run_path(str(cfg))  # (rl.py's configs have no batches)
        batch = c.get("batch_size", 0) * c.get("block_size", 0)
        if 0 < 2 * batch <= total:  # the data holds two batches: train.py must find one in each split
            assert min(n.values()) >= batch, (cfg.name, n)
    assert n["val"] >= 512 and json.loads((data / "meta.json").read_text())["val_stories"] >= n_stories // 100


def test_val_input_and_several_train_files(tmp_path, capsys, enc):
    a = write(tmp_path / "part1.txt", "txt_blank", TRAIN[:2])
    b = write(tmp_path / "part2.jsonl", "jsonl", TRAIN[2:])
    v = write(tmp_path / "held_out.parquet", "parquet", VAL)
    assert run(capsys, "--input", a, b, "--val_input", v, "--out_dir", tmp_path / "o")[0] == 0
    check_output(enc, tmp_path / "o", TRAIN, VAL)


@pytest.mark.parametrize("name, is_val", [
    ("tinystories_sample_valid.txt", True), ("TinyStories-valid.txt", True), ("val.jsonl", True),
    ("validation-00000-of-00001.parquet", True), ("TinyStoriesV2-GPT4-valid.txt", True),
    ("TinyStories-train.txt", False), ("train-00000-of-00004.parquet", False),
    ("interval.txt", False), ("evaluation.txt", False)])
def test_is_val_file(name, is_val):
    assert prepare.is_val_file(f"/some/dir/{name}") == is_val


def test_worker_pool_gives_the_same_bytes(tmp_path, capsys, enc, monkeypatch):
    stories = [f"Story {i}: the {'big ' * (i % 5)}dog ran." for i in range(200)]
    t = write(tmp_path / "s.txt", "txt_eot", stories)
    assert run(capsys, "--input", t, "--out_dir", tmp_path / "one", "--num_proc", 1)[0] == 0
    monkeypatch.setattr(prepare, "CHUNK", 3)  # many chunks, so the Pool path really runs
    assert run(capsys, "--input", t, "--out_dir", tmp_path / "two", "--num_proc", 2)[0] == 0
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_hub_path_with_a_fake_datasets_module(tmp_path, capsys, enc, monkeypatch):
    class FakeSplit:  # just the Dataset API prepare uses: len() and ds[i:j]["text"]
        def __init__(self, texts):
            self.texts = texts

        def __len__(self):
            return len(self.texts)

        def __getitem__(self, s):
            return {"text": self.texts[s]}

    fake = types.SimpleNamespace(logging=types.SimpleNamespace(set_verbosity_error=lambda: None),
                                 load_dataset=lambda name: {"train": FakeSplit(["  A.\n"] + TRAIN + [""]),
                                                            "validation": FakeSplit(VAL)})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(prepare, "CHUNK", 2)
    assert run(capsys, "--out_dir", tmp_path, "--num_proc", 1)[0] == 0
    meta = check_output(enc, tmp_path, ["A."] + TRAIN, VAL)
    assert meta["source"] == "huggingface:roneneldan/TinyStories"


def test_subprocess_run_from_repo_root(tmp_path, enc):
    t = write(tmp_path / "TinyStories-train.txt", "txt_eot", TRAIN)
    v = write(tmp_path / "TinyStories-valid.txt", "txt_eot", VAL)
    p = subprocess.run([sys.executable, "prepare.py", "--input", t, v, "--out_dir", tmp_path / "o"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    check_output(enc, tmp_path / "o", TRAIN, VAL)


def test_real_tinystories_sample(tmp_path, capsys, enc):
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (data / "tinystories_sample_train.txt").exists():
        pytest.skip(f"no TinyStories sample in {data}")
    files = [data / "tinystories_sample_train.txt", data / "tinystories_sample_valid.txt"]
    assert run(capsys, "--input", *files, "--out_dir", tmp_path)[0] == 0
    def paragraphs(text):  # blank (or whitespace-only) lines separate stories in these files
        groups, cur = [], []
        for line in text.splitlines() + [""]:
            if line.strip():
                cur.append(line)
            elif cur:
                groups.append("\n".join(cur).strip())
                cur = []
        return groups
    check_output(enc, tmp_path, *(paragraphs(f.read_text()) for f in files))
    # the training file alone: its last stories held out, a debug-config batch or more in each split
    assert run(capsys, "--input", files[0], "--out_dir", tmp_path / "one")[0] == 0
    one = [np.fromfile(tmp_path / "one" / name, np.uint16) for name in ("train.bin", "val.bin")]
    assert np.concatenate(one).tobytes() == (tmp_path / "train.bin").read_bytes()
    assert min(map(len, one)) >= prepare.MIN_TOKENS


# -----------------------------------------------------------------------------
# errors: one line on stderr, non-zero exit, nothing written

def bad_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return p


BAD_FILES = [  # (file name, content, text the error must mention)
    ("empty.txt", "  \n\n \n", "no stories"),
    ("stories.csv", "text\nhello\n", "unknown extension '.csv'"),
    ("notext.jsonl", '{"text": "ok"}\n{"story": "no"}\n', "notext.jsonl:2"),
    ("broken.jsonl", '{"text": "ok"}\n\n{"text": "no\n', "broken.jsonl:3: invalid JSON"),
    ("number.jsonl", '{"text": 5}\n', "not a string"),
    ("broken.json", '[\n{"text": "a"},\n{"text": }\n]', "broken.json:3: invalid JSON"),
    ("notext.json", '[{"text": "a"}, {"txt": "b"}]', "item 1"),
    ("dict.json", '{"text": ["a", "b"]}', "expected a JSON list"),
    ("garbage.parquet", b"definitely not parquet", "cannot read as parquet"),
    ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), "not UTF-8"),
]


@pytest.mark.parametrize("name, content, expect", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_input_file(tmp_path, capsys, fake_enc, name, content, expect):
    good = write(tmp_path / "good.txt", "txt_blank", TRAIN)
    bad = bad_file(tmp_path, name, content)
    code, out, err = run(capsys, "--input", good, bad, "--out_dir", tmp_path / "o")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert not (tmp_path / "o").exists()


def test_parquet_without_text_column(tmp_path, capsys, fake_enc):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"story": ["a", "b"]}), tmp_path / "x.parquet")
    code, _, err = run(capsys, "--input", tmp_path / "x.parquet", "--out_dir", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1 and "no 'text' column (columns: story)" in err


@pytest.mark.parametrize("case", ["missing", "directory", "only_val", "too_few", "val_input_alone",
                                  "bad_fraction", "bad_num_proc", "unknown_flag", "train_is_val"])
def test_bad_arguments(tmp_path, capsys, fake_enc, case):
    one = write(tmp_path / "one.txt", "txt_blank", ["Just one story."])
    good = write(tmp_path / "good.txt", "txt_blank", TRAIN)
    out = ["--out_dir", tmp_path / "o"]
    argv, expect = {
        "missing": (["--input", good, tmp_path / "nope.txt"], "no such file"),
        "directory": (["--input", tmp_path], "not a regular file"),
        "only_val": (["--input", write(tmp_path / "valid.txt", "txt_blank", VAL)], "no training input"),
        "too_few": (["--input", one], "too few"),
        "val_input_alone": (["--val_input", good], "--val_input needs --input"),
        "bad_fraction": (["--input", good, "--val_fraction", "1.5"], "--val_fraction"),
        "bad_num_proc": (["--input", good, "--num_proc", "0"], "--num_proc"),
        "unknown_flag": (["--input", good, "--frobnicate"], "unrecognized arguments"),
        "train_is_val": (["--input", good, "--val_input", tmp_path / "." / "good.txt"], "both training and"),
    }[case]
    code, _, err = run(capsys, *out, *argv)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["is_a_file", "in_a_file", "unwritable", "is_a_file_hub"])
def test_bad_out_dir_is_caught_before_reading_anything(tmp_path, capsys, fake_enc, monkeypatch, case):
    good = write(tmp_path / "good.txt", "txt_blank", TRAIN)
    out_dir = {"in_a_file": good / "sub", "unwritable": tmp_path / "locked" / "data"}.get(case, good)
    if case == "unwritable":  # chmod would not stop root: fail the way a read-only folder does
        def makedirs(path, exist_ok=False):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "locked"))
        monkeypatch.setattr(os, "makedirs", makedirs)

    def too_early(*args):
        raise AssertionError("read or downloaded before checking --out_dir")
    monkeypatch.setattr(prepare, "read_stories", too_early)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(logging=None, load_dataset=too_early))
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run(capsys, *(["--input", good] * (case != "is_a_file_hub")), "--out_dir", out_dir)
    why = {"in_a_file": "Not a directory", "unwritable": "Permission denied"}.get(case)
    why = why or "a file, not a folder"
    assert (code, out, err) == (1, "", f"error: cannot write to {out_dir} ({why})\n")
    assert sorted(tmp_path.rglob("*")) == before


def test_failed_run_removes_the_folders_it_made(tmp_path, capsys, fake_enc):
    t = write(tmp_path / "train.txt", "txt_blank", TRAIN)
    v = write(tmp_path / "valid.txt", "txt_blank", ["Fine.", "BOOM goes the story."])  # fails mid-tokenizing
    code, _, err = run(capsys, "--input", t, v, "--out_dir", tmp_path / "new" / "data")
    assert code == 1 and "does not fit in uint16" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.txt", "valid.txt"]


def test_replacing_says_what_the_folder_held(tmp_path, capsys, fake_enc):
    t, v = write(tmp_path / "train.txt", "txt_blank", TRAIN), write(tmp_path / "valid.txt", "txt_blank", VAL)
    assert run(capsys, "--input", t, v, "--out_dir", tmp_path / "o")[0] == 0
    code, _, err = run(capsys, "--input", t, v, "--out_dir", tmp_path / "o")
    assert code == 0 and err == f"replacing {tmp_path / 'o'} (train 6 tokens, val 4 tokens)\n"


def test_another_runs_temporary_file_is_left_alone(tmp_path, capsys, fake_enc):
    t, v = write(tmp_path / "train.txt", "txt_blank", TRAIN), write(tmp_path / "valid.txt", "txt_blank", VAL)
    (tmp_path / "o").mkdir()
    theirs = tmp_path / "o" / "train.bin.tmp"  # what a run writing to the same folder has so far
    theirs.write_bytes(b"half a split")
    assert run(capsys, "--input", t, v, "--out_dir", tmp_path / "o")[0] == 0
    assert theirs.read_bytes() == b"half a split"
    names = sorted(p.name for p in theirs.parent.iterdir())
    assert names == ["meta.json", "train.bin", "train.bin.tmp", "val.bin"]


def test_a_big_input_says_it_is_being_read(tmp_path, capsys, fake_enc, monkeypatch):
    t, v = write(tmp_path / "train.txt", "txt_blank", TRAIN), write(tmp_path / "valid.txt", "txt_blank", VAL)
    monkeypatch.setattr(os.path, "getsize", lambda path: 3 * 2**30)  # the hub's TinyStoriesV2 train file
    code, _, err = run(capsys, "--input", t, v, "--out_dir", tmp_path / "o")
    assert code == 0 and err == f"reading {t} (3.0 GiB)\nreading {v} (3.0 GiB)\n"


def test_token_id_too_big_for_uint16_keeps_previous_output(tmp_path, capsys, fake_enc):
    t = write(tmp_path / "train.txt", "txt_blank", TRAIN)
    v = write(tmp_path / "valid.txt", "txt_blank", VAL)
    assert run(capsys, "--input", t, v, "--out_dir", tmp_path / "o")[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    # train.bin.tmp is complete by the time the val split hits the bad id
    v = write(tmp_path / "valid2.txt", "txt_blank", ["Fine.", "BOOM goes the story."])
    code, _, err = run(capsys, "--input", t, v, "--out_dir", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1 and "does not fit in uint16" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before  # no .tmp either


def test_bad_second_file_keeps_previous_output(tmp_path, capsys, enc):
    t, v = write(tmp_path / "train.txt", "txt_blank", TRAIN), write(tmp_path / "valid.txt", "txt_blank", VAL)
    assert run(capsys, "--input", t, v, "--out_dir", tmp_path / "o")[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    bad = bad_file(tmp_path, "more.jsonl", '{"text": "fine"}\n{oops\n')
    code, _, err = run(capsys, "--input", t, v, bad, "--out_dir", tmp_path / "o")
    assert code == 1 and "more.jsonl:2" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before


def test_tiktoken_unavailable(tmp_path, capsys, monkeypatch):
    import tiktoken

    def no_network(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'\nmore lines")
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    t = write(tmp_path / "a.txt", "txt_blank", TRAIN)
    code, _, err = run(capsys, "--input", t, "--out_dir", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1 and "TIKTOKEN_CACHE_DIR" in err


def test_hub_unreachable(tmp_path, capsys, fake_enc, monkeypatch):
    def unreachable(name):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
    fake = types.SimpleNamespace(logging=types.SimpleNamespace(set_verbosity_error=lambda: None),
                                 load_dataset=unreachable)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    code, _, err = run(capsys, "--out_dir", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1
    assert "Hugging Face hub" in err and "--input" in err and "HF_DATASETS_OFFLINE=1" in err


def test_subprocess_errors_have_no_traceback(tmp_path):
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty"))  # bad input is caught before tiktoken
    for argv in (["--input", str(tmp_path / "missing.txt")], ["--val_fraction", "2"]):
        p = subprocess.run([sys.executable, "prepare.py", *argv, "--out_dir", str(tmp_path / "o")],
                           cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
        assert p.returncode != 0 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("unbuffered", [False, True])
def test_output_into_a_pipe_closed_early(tmp_path, enc, unbuffered):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update({"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    p = subprocess.run(f"'{sys.executable}' prepare.py --help | head -3", shell=True, cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.startswith("usage: prepare.py") and p.stdout.count("\n") == 3 and p.stderr == ""
    # the reader gone before we write (| head done already): Python's exit, or print, complained about stdout
    t, v = write(tmp_path / "train.txt", "txt_blank", TRAIN), write(tmp_path / "valid.txt", "txt_blank", VAL)
    for argv in (["--help"], ["--input", str(t), str(v), "--out_dir", str(tmp_path / "o")]):
        p = subprocess.Popen([sys.executable, "prepare.py", *argv], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.stdout.close()
        p.wait(timeout=60)
        assert p.stderr.read() == ""
    check_output(enc, tmp_path / "o", TRAIN, VAL)


def test_ctrl_c_while_workers_tokenize(tmp_path):
    """Ctrl-C goes to the whole process group: workers died of it, leaving the parent waiting forever."""
    t, marker = write(tmp_path / "train.txt", "txt_blank", TRAIN * 50), tmp_path / "tokenizing"
    script = f"""if True:  # (the spawned workers run this file too, as __mp_main__: they get the slow encoder)
        import pathlib, signal, sys, time
        signal.signal(signal.SIGINT, signal.default_int_handler)  # not inherited as ignored
        sys.path.insert(0, {str(REPO)!r})
        import prepare

        class SlowEnc:
            name, n_vocab, eot_token = "slow", 50257, 50256

            def encode_ordinary(self, text):
                pathlib.Path({str(marker)!r}).touch()
                time.sleep(0.05)
                return [1] * 300
        prepare.load_encoding, prepare.CHUNK = SlowEnc, 2
        if __name__ == "__main__":
            sys.exit(prepare.main(["--input", {str(t)!r}, "--out_dir", {str(tmp_path / "o")!r}, "--num_proc=2"]))
    """
    (tmp_path / "run.py").write_text(script)
    p = subprocess.Popen([sys.executable, str(tmp_path / "run.py")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not marker.exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert (p.returncode, out, err) == (130, "", "error: interrupted\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("split_by", ["hold_out", "val_file"])
def test_instruct_writes_prompts_stories_and_loss_masks(tmp_path, capsys, enc, split_by):
    """--instruct: each story after its words-task prompt; the masks mark the story and its <|endoftext|>
    (what carries the loss), one byte per token, also across the held-out split."""
    stories = [f"Lily found a {w} toy near the old {w} tree. She smiled and hugged her little {w} dog." for w in
               ("red", "blue", "green", "yellow", "pink")] * 40
    (tmp_path / "s.txt").write_text("\n\n".join(stories))
    (tmp_path / "v.txt").write_text("\n\n".join(stories[:50]))
    extra = ["--val_input", tmp_path / "v.txt"] if split_by == "val_file" else []
    code, _, err = run(capsys, "--instruct", "--input", tmp_path / "s.txt", *extra, "--out_dir", tmp_path / "d")
    assert code == 0, err
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["instruct"] is True
    for split in ("train", "val"):
        ids = np.fromfile(tmp_path / "d" / f"{split}.bin", np.uint16)
        mask = np.fromfile(tmp_path / "d" / f"{split}.mask.bin", np.uint8)
        assert len(ids) == len(mask) and set(mask) == {0, 1}
        assert (mask[ids == enc.eot_token] == 1).all()  # every story's end-of-text is a target
        prompts, texts = enc.decode(ids[mask == 0].tolist()), enc.decode(ids[mask == 1].tolist())
        assert "Words: " in prompts and "Story: " in prompts and "Words:" not in texts and "Lily found" in texts
