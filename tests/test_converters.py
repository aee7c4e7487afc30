"""``padmmirnn data prepare|inspect|list``: round trips per format on small generated
files, and bad data as one clear line with no output left behind."""

from __future__ import annotations

import gzip
import json
import struct

import h5py
import numpy as np
import pytest

from padmmirnn.cli import main
from padmmirnn.converters import build_vocabulary, encode, tokenize
from padmmirnn.datafiles import read_info, read_lengths, read_slice, read_strings

IDX_NAMES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """An array in the IDX format (big-endian header, then the data)."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    dtype = {0x08: ">u1", 0x0D: ">f4"}[code]
    return header + array.astype(dtype).tobytes()


def write_idx_folder(folder, n=(12, 5), seed=0):
    """A small MNIST-like folder: gzipped IDX images [n, 4, 3] and labels 0..9."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    arrays = {}
    for (split, (img, lab)), count in zip(IDX_NAMES.items(), n, strict=True):
        images = rng.integers(0, 256, (count, 4, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        (folder / img).write_bytes(gzip.compress(idx_bytes(images)))
        (folder / lab).write_bytes(gzip.compress(idx_bytes(labels)))
        arrays[split] = (images, labels)
    return arrays


def write_imdb_tree(root):
    """aclImdb/{train,test}/{pos,neg}/*.txt with distinct reviews."""
    reviews = {}
    for split in ("train", "test"):
        for label in ("pos", "neg"):
            (root / "aclImdb" / split / label).mkdir(parents=True)
            for i in range(3):
                text = f"{split} {label} review {i}: great<br />fun" if label == "pos" else \
                    f"{split} {label} review {i}: dull, boring"
                (root / "aclImdb" / split / label / f"{i}_7.txt").write_text(text)
                reviews[text.replace("<br />", " ")] = int(label == "pos")
    return reviews


def load(path):
    """(info, sample-major inputs, targets) through the engine's reader."""
    info = read_info(str(path))
    local = read_slice(info, 0, info.n, np.float64)
    inputs = local.inputs.transpose(1, 0, 2) if info.kind == "dense" else local.inputs.T
    targets = local.targets.T if info.many_to_many else local.targets[0]
    return info, inputs, targets


def decode(row, vocabulary):
    return [vocabulary[i] for i in row if i != 0]


@pytest.mark.parametrize("pixels", [False, True])
def test_idx_round_trip(tmp_path, pixels):
    arrays = write_idx_folder(tmp_path / "mnist")
    out = tmp_path / "m_train.h5"
    argv = ["data", "prepare", "idx", "--source", str(tmp_path / "mnist"), "--out", str(out)]
    assert main(argv + (["--pixels"] if pixels else [])) == 0
    for split, path in (("train", out), ("test", tmp_path / "m_test.h5")):
        info, x, y = load(path)
        images, labels = arrays[split]
        expect = images.astype(np.float64) / 255.0
        expect = expect.reshape(len(images), 12, 1) if pixels else expect
        assert (info.kind, info.classes, info.many_to_many) == ("dense", 10, False)
        np.testing.assert_allclose(x, expect, rtol=1e-6)
        np.testing.assert_array_equal(y, labels)
    with h5py.File(out) as f:
        assert "MNIST" in f.attrs["source"] and "CC BY-SA" in f.attrs["license"]


def test_idx_fashion_and_sample_caps(tmp_path):
    arrays = write_idx_folder(tmp_path / "fashion-mnist")
    out = tmp_path / "f_train.h5"
    assert main(["data", "prepare", "idx", "--source", str(tmp_path / "fashion-mnist"),
                 "--out", str(out), "--samples", "7", "--test-samples", "2"]) == 0
    info, x, y = load(out)
    assert info.n == 7 and read_info(str(tmp_path / "f_test.h5")).n == 2
    np.testing.assert_array_equal(y, arrays["train"][1][:7])
    assert read_strings(str(out), "class_names")[9] == "Ankle boot"
    with h5py.File(out) as f:
        assert "Fashion-MNIST" in f.attrs["source"] and f.attrs["license"] == "MIT (Zalando SE)"


def test_imdb_round_trip(tmp_path):
    reviews = write_imdb_tree(tmp_path)
    out = tmp_path / "imdb_train.h5"
    assert main(["data", "prepare", "imdb", "--source", str(tmp_path), "--out", str(out),
                 "--steps", "12"]) == 0
    vocabulary = read_strings(str(out), "vocabulary")
    assert vocabulary[:2] == ["<pad>", "<unk>"] and "test" not in vocabulary
    for split, path in (("train", out), ("test", tmp_path / "imdb_test.h5")):
        info, x, y = load(path)
        assert (info.kind, info.n, info.steps, info.classes) == ("tokens", 6, 12, 2)
        assert info.dim == len(vocabulary) == len(read_strings(str(path), "vocabulary"))
        assert read_strings(str(path), "class_names") == ["neg", "pos"]
        got = {" ".join(decode(row, vocabulary)): int(label)
               for row, label in zip(x, y, strict=True)}
        # the test split is encoded with the training vocabulary: "test" is unknown
        expect = {" ".join(["<unk>" if w == "test" else w for w in tokenize(t, "word")]): lab
                  for t, lab in reviews.items() if t.startswith(split)}
        assert got == expect


def test_csv_round_trip_word_level_with_cap_and_test_fraction(tmp_path):
    src = tmp_path / "reviews.csv"
    rows = [("good fun film", "fresh"), ("bad, dull film", "rotten"), ("plot text", "plot"),
            ('a "quoted", long good film', "fresh"), ("dull", "rotten"), ("fun fun", "fresh")]
    src.write_text("category,text\n" + "".join(
        f'{lab},"{t.replace(chr(34), 2 * chr(34))}"\n' for t, lab in rows))
    out = tmp_path / "rt_train.h5"
    assert main(["data", "prepare", "csv", "--source", str(src), "--out", str(out),
                 "--label-column", "category", "--labels", "rotten,fresh", "--steps", "4",
                 "--vocab-size", "6", "--test-fraction", "0.2", "--seed", "3"]) == 0
    info, x, y = load(out)
    test_info, tx, ty = load(tmp_path / "rt_test.h5")
    assert (info.n, test_info.n, info.steps, info.dim, info.classes) == (4, 1, 4, 6, 2)
    vocabulary = read_strings(str(out), "vocabulary")
    assert len(vocabulary) == 6 and vocabulary[:2] == ["<pad>", "<unk>"]
    kept = {t: lab for t, lab in rows if lab != "plot"}
    index = {t: i for i, t in enumerate(vocabulary)}
    lengths = np.concatenate([read_lengths(info), read_lengths(test_info)])
    for row, label, length in zip(np.concatenate([x, tx]), np.concatenate([y, ty]), lengths,
                                  strict=True):
        # real tokens first (post-padding, the default), then <pad>; lengths = tokens kept
        match = [t for t in kept if np.array_equal(
            encode(tokenize(t, "word"), index, 4, "post", "pre"), row)]
        assert match and ["rotten", "fresh"][label] == kept[match[0]]
        assert length == min(len(tokenize(match[0], "word")), 4)
        assert (row[length:] == 0).all() and (row[:length] != 0).all()
    with h5py.File(out) as f:
        prepared = json.loads(f.attrs["prepared"])
        assert (prepared["level"], prepared["padding"], prepared["lengths"]) == (
            "word", "post", True)


def test_text_char_language_model(tmp_path):
    corpus = "To be, or not to be: that is the question.\n" * 3
    src = tmp_path / "play.txt"
    src.write_text(corpus)
    out = tmp_path / "lm_train.h5"
    assert main(["data", "prepare", "text", "--source", str(src), "--out", str(out),
                 "--steps", "10", "--test-fraction", "0.25"]) == 0
    info, x, y = load(out)
    vocabulary = read_strings(str(out), "vocabulary")
    assert info.many_to_many and info.classes == info.dim == len(vocabulary)
    cut = len(corpus) - len(corpus) // 4
    full, rest = divmod(cut - 1, 10)
    assert rest and info.n == full + 1  # the short last window is kept, with its length
    lengths = read_lengths(info)
    np.testing.assert_array_equal(lengths, [10] * full + [rest])
    text = "".join(vocabulary[i] for i in x.ravel() if i)
    assert text == corpus[: cut - 1] and (x[-1, rest:] == 0).all()
    np.testing.assert_array_equal(y[:-1, :-1], x[:-1, 1:])
    np.testing.assert_array_equal(y[-1, :rest - 1], x[-1, 1:rest])
    assert (y[-1, rest:] == 0).all()
    assert "".join(vocabulary[i] for i in y[:-1, -1]) == corpus[10: full * 10 + 1: 10]
    assert "".join(vocabulary[i] for i in y[-1, :rest]) == corpus[full * 10 + 1: cut]
    test_info, tx, _ = load(tmp_path / "lm_test.h5")
    assert "".join(vocabulary[i] for i in tx.ravel() if i) == corpus[cut: -1]


def test_tokenisation_helpers():
    assert tokenize("Don't stop, Me!", "word") == ["don't", "stop", ",", "me", "!"]
    vocab = build_vocabulary([["b", "a", "b", "c", "a", "b"]], 4)
    assert vocab == ["<pad>", "<unk>", "b", "a"]
    index = {t: i for i, t in enumerate(vocab)}
    np.testing.assert_array_equal(encode(["a", "c"], index, 4, "pre", "pre"), [0, 0, 3, 1])
    np.testing.assert_array_equal(encode(["a", "b", "a"], index, 2, "post", "post"), [3, 2])
    np.testing.assert_array_equal(encode(["a", "b", "a"], index, 2, "pre", "pre"), [2, 3])
    np.testing.assert_array_equal(encode([], index, 3, "post", "pre"), [0, 0, 0])


def test_adding_still_works(tmp_path, capsys):
    out = tmp_path / "add_train.h5"
    assert main(["data", "prepare", "adding", "--out", str(out), "--steps", "8",
                 "--samples", "6", "--test-samples", "3"]) == 0
    assert (read_info(str(out)).n, read_info(str(tmp_path / "add_test.h5")).n) == (6, 3)
    assert "wrote" in capsys.readouterr().out


def test_inspect_and_list(tmp_path, capsys):
    write_imdb_tree(tmp_path)
    out = tmp_path / "imdb_train.h5"
    assert main(["data", "prepare", "imdb", "--source", str(tmp_path / "aclImdb"),
                 "--out", str(out), "--steps", "6"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("kind: tokens", "inputs: [6, 6] int32", "classes: 2",
                     "neg 3 (50.0%), pos 3 (50.0%)", "vocabulary (", "<pad> <unk>",
                     "source: Large Movie Review", "license: research use"):
        assert expected in text, expected
    assert main(["data", "list"]) == 0
    text = capsys.readouterr().out
    assert "default" in text and "mnist-rows" in text and "embedded default" in text


# ---------------------------------------------------------------- bad data


def _gz(path, payload: bytes):
    path.write_bytes(gzip.compress(payload))


def bad_empty(tmp_path):
    write_idx_folder(tmp_path / "src")
    (tmp_path / "src" / IDX_NAMES["test"][0]).write_bytes(b"")
    return ["idx", "--source", str(tmp_path / "src")], IDX_NAMES["test"][0], "file is empty"


def bad_truncated_gz(tmp_path):
    write_idx_folder(tmp_path / "src")
    path = tmp_path / "src" / IDX_NAMES["train"][0]
    path.write_bytes(path.read_bytes()[:40])
    return ["idx", "--source", str(tmp_path / "src")], path.name, "truncated or corrupt gzip"


def bad_magic(tmp_path):
    write_idx_folder(tmp_path / "src")
    _gz(tmp_path / "src" / IDX_NAMES["train"][1], b"\x00\x00\x42\x01" + bytes(16))
    return ["idx", "--source", str(tmp_path / "src")], IDX_NAMES["train"][1], "not an IDX file"


def bad_idx_labels(tmp_path):
    write_idx_folder(tmp_path / "src")
    _gz(tmp_path / "src" / IDX_NAMES["test"][1], idx_bytes(np.array([1, 2, 12, 3, 4])))
    return (["idx", "--source", str(tmp_path / "src")], IDX_NAMES["test"][1],
            "labels must lie in [0, 10) (--classes), found 12 at index 2")


def bad_nan(tmp_path):
    write_idx_folder(tmp_path / "src")
    images = np.zeros((12, 4, 3), np.float32)
    images[5, 1, 1] = np.inf
    _gz(tmp_path / "src" / IDX_NAMES["train"][0], idx_bytes(images, 0x0D))
    return (["idx", "--source", str(tmp_path / "src")], IDX_NAMES["train"][0],
            "NaN or inf (first at sample 5)")


def bad_ragged_csv(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nfine,a\nextra,b,field\nok,a\n")
    return ["csv", "--source", str(tmp_path / "d.csv")], "d.csv", "line 3: 3 fields, expected 2"


def bad_csv_labels(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nfine,0\nbad,2\n")
    return (["csv", "--source", str(tmp_path / "d.csv"), "--classes", "2"], "d.csv",
            "labels must lie in [0, 2) (--classes), found 2")


def bad_utf8(tmp_path):
    (tmp_path / "t.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 50)
    return ["text", "--source", str(tmp_path / "t.txt")], "t.txt", "not valid UTF-8"


def bad_short_text(tmp_path):
    (tmp_path / "t.txt").write_text("short text")
    return (["text", "--source", str(tmp_path / "t.txt"), "--steps", "50"], "t.txt",
            "10 tokens, too short for one sequence of --steps 50")


def bad_empty_text(tmp_path):
    (tmp_path / "t.txt").write_text("")
    return ["text", "--source", str(tmp_path / "t.txt")], "t.txt", "file is empty"


def bad_imdb_review(tmp_path):
    write_imdb_tree(tmp_path)
    (tmp_path / "aclImdb" / "test" / "neg" / "9_1.txt").write_bytes(b"\xff\xfe bad")
    return ["imdb", "--source", str(tmp_path)], "9_1.txt", "not valid UTF-8"


BAD = [bad_empty, bad_truncated_gz, bad_magic, bad_idx_labels, bad_nan, bad_ragged_csv,
       bad_csv_labels, bad_utf8, bad_short_text, bad_empty_text, bad_imdb_review]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
def test_bad_data_is_one_line_and_leaves_no_output(tmp_path, capsys, make):
    args, filename, problem = make(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["data", "prepare", *args, "--out", str(out / "x_train.h5")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("padmmirnn: error: ") and filename in err and problem in err, err
    assert list(out.iterdir()) == []  # not even a temporary file


def test_option_errors_are_one_line(tmp_path, capsys):
    write_idx_folder(tmp_path / "src")
    cases = [(["idx", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "x.h5")],
              "name the output NAME_train.h5"),
             (["csv", "--out", str(tmp_path / "x.h5")], "needs --source"),
             (["idx", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "no/x.h5")],
              "does not exist")]
    for args, problem in cases:
        assert main(["data", "prepare", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and problem in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------- lengths and T from the data


def _counted_csv(path, counts):
    """A CSV of texts with the given word counts (words w0, w1, ...), labels a/b."""
    path.write_text("text,label\n" + "".join(
        f"{' '.join(f'w{j}' for j in range(c))},{'ab'[i % 2]}\n" for i, c in enumerate(counts)))


def test_steps_from_the_99th_percentile_of_the_training_texts(tmp_path, capsys):
    src = tmp_path / "c.csv"
    _counted_csv(src, np.random.default_rng(0).permutation(np.arange(1, 201)))
    out = tmp_path / "c_train.h5"
    assert main(["data", "prepare", "csv", "--source", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    # 200 texts of 1..200 words: the smallest T with 99% of them no longer is 198; it cuts 2
    assert printed[0].startswith("steps: T = 198, the 99th percentile") and \
        "cuts 1.0% of them (2)" in printed[0]
    info = read_info(str(out))
    assert info.steps == 198 and info.has_lengths
    lengths = read_lengths(info)
    assert lengths.max() == 198 and sorted(lengths)[-3:] == [198, 198, 198]
    with h5py.File(out) as f:
        assert json.loads(f.attrs["prepared"])["steps_from"] == "99th percentile"
    # --steps overrides, and nothing is said about T
    assert main(["data", "prepare", "csv", "--source", str(src), "--out", str(out),
                 "--steps", "7"]) == 0
    assert not capsys.readouterr().out.startswith("steps:")
    assert read_info(str(out)).steps == 7 and read_lengths(read_info(str(out))).max() == 7


def test_imdb_writes_lengths_post_padded_and_pre_padding_writes_none(tmp_path):
    write_imdb_tree(tmp_path)
    out = tmp_path / "imdb_train.h5"
    assert main(["data", "prepare", "imdb", "--source", str(tmp_path), "--out", str(out),
                 "--steps", "5"]) == 0
    for path in (out, tmp_path / "imdb_test.h5"):
        info, x, _ = load(path)
        lengths = read_lengths(info)
        assert lengths is not None and (lengths >= 1).all() and (lengths <= 5).all()
        for row, length in zip(x, lengths, strict=True):
            assert (row[:length] != 0).all() and (row[length:] == 0).all()
    assert main(["data", "prepare", "imdb", "--source", str(tmp_path), "--out", str(out),
                 "--steps", "30", "--padding", "pre"]) == 0
    info, x, _ = load(out)
    assert not info.has_lengths and read_lengths(info) is None and (x[:, 0] == 0).all()


def test_empty_text_has_length_one_and_idx_adding_write_no_lengths(tmp_path):
    (tmp_path / "e.csv").write_text('text,label\n"",a\nsome words here,b\n')
    out = tmp_path / "e_train.h5"
    assert main(["data", "prepare", "csv", "--source", str(tmp_path / "e.csv"),
                 "--out", str(out), "--seed", "1"]) == 0
    info, x, y = load(out)
    assert info.steps == 3 and sorted(read_lengths(info)) == [1, 3]
    write_idx_folder(tmp_path / "mnist")
    assert main(["data", "prepare", "idx", "--source", str(tmp_path / "mnist"),
                 "--out", str(tmp_path / "m_train.h5")]) == 0
    assert main(["data", "prepare", "adding", "--out", str(tmp_path / "a_train.h5"),
                 "--steps", "6", "--samples", "4", "--test-samples", "2"]) == 0
    for name in ("m_train.h5", "m_test.h5", "a_train.h5", "a_test.h5"):
        assert not read_info(str(tmp_path / name)).has_lengths


def test_inspect_shows_lengths(tmp_path, capsys):
    _counted_csv(tmp_path / "c.csv", [1, 2, 3, 4])
    out = tmp_path / "c_train.h5"
    assert main(["data", "prepare", "csv", "--source", str(tmp_path / "c.csv"),
                 "--out", str(out), "--steps", "4"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out)]) == 0
    assert "lengths: 1..4, median 2.5, mean 2.5; 75.0% shorter than T (37.5% of the " \
        "steps are padding)" in capsys.readouterr().out


def _with_lengths(path, lengths, n=6, steps=4):
    """A token split whose ``lengths`` dataset is written as given (h5py directly)."""
    with h5py.File(path, "w") as f:
        f["inputs"] = np.ones((n, steps), np.int32)
        f["targets"] = np.zeros(n, np.int32)
        f["lengths"] = lengths
        f.attrs.update({"kind": "tokens", "classes": 2, "vocab": 3})


BAD_LENGTHS = [
    (np.array([1, 2, 0, 4, 4, 4]), "lengths must lie in [1, 4] (T), found 0 at sample 2"),
    (np.array([1, 2, 3, 4, 5, 4]), "lengths must lie in [1, 4] (T), found 5 at sample 4"),
    (np.array([1, 2, 3, 4, 4]), "lengths shape (5,) does not match inputs of 6 sequences"),
    (np.full((6, 1), 2), "lengths shape (6, 1) does not match"),
    (np.full(6, 2.0), "lengths must be integers, got float64"),
]


@pytest.mark.parametrize("lengths,problem", BAD_LENGTHS)
def test_bad_lengths_are_one_line_before_any_output(tmp_path, capsys, lengths, problem):
    path = tmp_path / "bad_train.h5"
    _with_lengths(path, lengths)
    out = tmp_path / "run"
    code = main(["train", "--dataset", str(path), "--out", str(out), "--iterations", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("padmmirnn: error: ") and str(path) in err and problem in err, err
    assert not out.exists()


def test_writer_refuses_bad_lengths_and_leaves_no_file(tmp_path):
    from padmmirnn.datafiles import write_dataset
    from padmmirnn.errors import DataError

    path = tmp_path / "w_train.h5"
    with pytest.raises(DataError, match="found 0 at sample 1"):
        write_dataset(path, np.ones((3, 4), np.int32), np.zeros(3, np.int32), classes=2,
                      vocab=3, lengths=np.array([4, 0, 2]))
    assert list(tmp_path.iterdir()) == []
    write_dataset(path, np.ones((3, 4), np.int32), np.zeros(3, np.int32), classes=2,
                  vocab=3, lengths=np.array([4, 1, 2]))
    info = read_info(str(path))
    local = read_slice(info, 1, 3, np.float64)
    np.testing.assert_array_equal(local.lengths, [1, 2])
    np.testing.assert_array_equal(local.take(np.array([1, 0])).lengths, [2, 1])


def test_padding_is_for_imdb_and_csv(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("some text " * 30)
    code = main(["data", "prepare", "text", "--source", str(tmp_path / "t.txt"),
                 "--out", str(tmp_path / "t_train.h5"), "--padding", "post"])
    assert code == 2 and "--padding applies to imdb and csv" in capsys.readouterr().err
