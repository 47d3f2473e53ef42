"""Tests for prepare.py: every local input format round-trips, val splits, atomic writes, clean errors."""
import json
import os
import subprocess
import sys
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
        pytest.skip(f"tiktoken's gpt2 encoding is unavailable (no cache, no internet; set TIKTOKEN_CACHE_DIR): {e}")


class FakeEnc:
    """Stands in for tiktoken where a test only needs prepare's control flow; 'BOOM' gives a too-big id."""
    name, n_vocab, eot_token = "fake", 70001, 50256

    def encode_ordinary(self, text):
        return [70000] if "BOOM" in text else [len(text) % 1000]


@pytest.fixture
def fake_enc(monkeypatch):
    monkeypatch.setattr(prepare, "load_encoding", lambda: FakeEnc())


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
    train = TRAIN + ["Mom said:\n\nit is time for bed."] if fmt != "txt_blank" else TRAIN  # paragraphs need EOT lines
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


@pytest.mark.parametrize("frac, n_val", [(None, 1), (0.3, 3), (0.001, 1)])
def test_val_fraction_takes_the_last_stories(tmp_path, capsys, enc, frac, n_val):
    stories = [f"Story number {i} is here." for i in range(10)]
    t = write(tmp_path / "all.txt", "txt_blank", stories)
    extra = ["--val_fraction", frac] if frac else []
    assert run(capsys, "--input", t, "--out_dir", tmp_path / "o", *extra)[0] == 0
    meta = check_output(enc, tmp_path / "o", stories[:-n_val], stories[-n_val:])
    assert meta["val_files"] == [] and "val_fraction" in meta["val_from"]


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
    stories = [f"Story {i}: the {'big ' * (i % 5)}dog ran." for i in range(40)]
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
    p = subprocess.run([sys.executable, "prepare.py", "--input", str(t), str(v), "--out_dir", str(tmp_path / "o")],
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
    code, out, err = run(capsys, "--input", good, bad_file(tmp_path, name, content), "--out_dir", tmp_path / "o")
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
                                  "bad_fraction", "bad_num_proc", "unknown_flag", "not_writable"])
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
        "not_writable": (["--input", good, "--out_dir", one / "sub"], "cannot write to"),
    }[case]
    code, _, err = run(capsys, *out, *argv)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert not (tmp_path / "o").exists()


def test_token_id_too_big_for_uint16_keeps_previous_output(tmp_path, capsys, fake_enc):
    t = write(tmp_path / "train.txt", "txt_blank", TRAIN)
    assert run(capsys, "--input", t, write(tmp_path / "valid.txt", "txt_blank", VAL), "--out_dir", tmp_path / "o")[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    # train.bin.tmp is complete by the time the val split hits the bad id
    v = write(tmp_path / "valid2.txt", "txt_blank", ["Fine.", "BOOM goes the story."])
    code, _, err = run(capsys, "--input", t, v, "--out_dir", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1 and "does not fit in uint16" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before  # no .tmp either


def test_bad_second_file_keeps_previous_output(tmp_path, capsys, enc):
    t = write(tmp_path / "train.txt", "txt_blank", TRAIN)
    assert run(capsys, "--input", t, "--out_dir", tmp_path / "o")[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()}
    bad = bad_file(tmp_path, "more.jsonl", '{"text": "fine"}\n{oops\n')
    code, _, err = run(capsys, "--input", t, bad, "--out_dir", tmp_path / "o")
    assert code == 1 and "more.jsonl:2" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").iterdir()} == before


def test_tiktoken_unavailable(tmp_path, capsys, monkeypatch):
    import tiktoken

    def no_network(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'\nmore lines")
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    code, _, err = run(capsys, "--input", write(tmp_path / "a.txt", "txt_blank", TRAIN), "--out_dir", tmp_path / "o")
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
