"""The text8 zoo data loaders on tiny fixture trees that mimic each Debian package (no apt, no network)."""

from __future__ import annotations

import bz2
import lzma
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mergesmith.bench.zoo import cache
from mergesmith.bench.zoo import text8_data as t8
from mergesmith.bench.zoo.cache import decompress_rdb_record, fetch_deb, read_r_lazyload
from mergesmith.errors import MergeError

rdata = pytest.importorskip("rdata")


# ---------------------------------------------------------------------------------------------------------
# helpers that write package-like trees


def write_fortunes(path: Path, entries: list[str], encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n%\n".join(entries) + "\n%\n").encode(encoding))
    path.with_name(path.name + ".dat").write_bytes(b"\x00\x00\x00\x02binary index")
    return path


def sentences(prefix: str, n: int) -> list[str]:
    return [f"{prefix} fortune number {i}, long enough to keep." for i in range(n)]


def rds_bytes(obj: object, tmp_path: Path) -> bytes:
    """Serialize ``obj`` as R would (uncompressed XDR stream) with rdata's writer."""
    path = tmp_path / "obj.rds"
    rdata.write_rds(path, obj, compression=None)
    return path.read_bytes()


def frame_record(data: bytes, kind: str) -> bytes:
    """One ``.rdb`` record as R writes it: 4-byte length, then (for kinds other than ``zlib1``) a type byte."""
    header = struct.pack(">I", len(data))
    if kind == "zlib1":
        return header + zlib.compress(data)
    if kind == "Z":
        raw = lzma.compress(data, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
        return header + b"Z" + raw
    if kind == "2":
        return header + b"2" + bz2.compress(data)
    if kind == "1":
        return header + b"1" + zlib.compress(data)
    return header + b"0" + data


def write_lazyload(data_dir: Path, objects: dict[str, object], tmp_path: Path, compressed: int = 3) -> Path:
    """Write ``Rdata.rdb`` + ``Rdata.rdx`` holding ``objects``, like R's makeLazyLoadDB."""
    data_dir.mkdir(parents=True, exist_ok=True)
    kinds = ["Z", "2", "1", "0"]
    rdb = b""
    variables = {}
    for i, (name, obj) in enumerate(objects.items()):
        kind = "zlib1" if compressed == 1 else kinds[i % len(kinds)]
        record = frame_record(rds_bytes(obj, tmp_path), kind)
        variables[name] = np.array([len(rdb), len(record)], dtype=np.int32)
        rdb += record
    (data_dir / "Rdata.rdb").write_bytes(rdb)
    index = {"variables": variables, "references": {}, "compressed": np.array([compressed], dtype=np.int32)}
    rdata.write_rds(data_dir / "Rdata.rdx", index, compression="gzip")
    return data_dir


def strings(values: list[str]) -> pd.Series:
    return pd.Series(values, dtype=object)


# ---------------------------------------------------------------------------------------------------------
# cache


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MERGESMITH_CACHE", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MERGESMITH_CACHE")
    assert cache.cache_dir() == Path.home() / ".cache" / "mergesmith"


def test_fetch_deb_is_idempotent_with_marker(monkeypatch, tmp_path):
    root = tmp_path / "debs" / "somepkg" / "root"
    root.mkdir(parents=True)
    (tmp_path / "debs" / "somepkg" / ".unpacked").write_text("somepkg_1_all.deb\n")

    def no_run(*args, **kwargs):
        raise AssertionError("apt must not run for a fetched package")

    monkeypatch.setattr(cache, "_run", no_run)
    assert fetch_deb("somepkg", tmp_path) == root
    assert cache.fetch_debs(["somepkg", "somepkg"], tmp_path) == {"somepkg": root}


def test_fetch_deb_failure_updates_once_and_names_package(monkeypatch, tmp_path):
    calls = []

    def failing(cmd, cwd):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package nosuchpkg\n")

    monkeypatch.setattr(cache, "_run", failing)
    with pytest.raises(MergeError, match=r"'nosuchpkg'.*Unable to locate") as info:
        fetch_deb("nosuchpkg", tmp_path)
    assert "\n" not in str(info.value)
    assert calls == [
        ["apt-get", "download", "nosuchpkg"],
        ["apt-get", "update"],
        ["apt-get", "download", "nosuchpkg"],
    ]


def test_fetch_deb_unpacks_and_marks(monkeypatch, tmp_path):
    def fake(cmd, cwd):
        if cmd[:2] == ["apt-get", "download"]:
            (cwd / "pkg_1.0_all.deb").write_bytes(b"deb")
        elif cmd[0] == "dpkg":
            (Path(cmd[3]) / "usr").mkdir()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cache, "_run", fake)
    root = fetch_deb("pkg", tmp_path)
    assert root == tmp_path / "debs" / "pkg" / "root"
    assert (root / "usr").is_dir()
    assert (tmp_path / "debs" / "pkg" / ".unpacked").exists()


# ---------------------------------------------------------------------------------------------------------
# R lazy-load format


@pytest.mark.parametrize("kind", ["Z", "2", "1", "0"])
def test_decompress_rdb_record_typed(kind):
    data = b"X\n" + bytes(range(256)) * 20
    assert decompress_rdb_record(frame_record(data, kind), compressed=3) == data


def test_decompress_rdb_record_zlib_and_stored():
    data = b"X\nhello" * 50
    assert decompress_rdb_record(frame_record(data, "zlib1"), compressed=1) == data
    assert decompress_rdb_record(data, compressed=0) == data


def test_decompress_rdb_record_errors():
    with pytest.raises(MergeError, match="type byte"):
        decompress_rdb_record(struct.pack(">I", 3) + b"Qabc", compressed=3)
    with pytest.raises(MergeError, match="header says"):
        decompress_rdb_record(struct.pack(">I", 99) + b"0abc", compressed=3)


@pytest.mark.parametrize("compressed", [1, 3])
def test_read_r_lazyload_round_trip(tmp_path, compressed):
    objects = {
        "lines": np.array(["a", "b", ""]),
        "frame": pd.DataFrame(
            {"review": strings(["good", "bad"]), "score": pd.Categorical(["great", "other"])}
        ),
        "numbers": np.array([1.5, 2.5]),
    }
    data_dir = write_lazyload(tmp_path / "data", objects, tmp_path, compressed=compressed)
    loaded = read_r_lazyload(data_dir)
    assert list(loaded) == ["lines", "frame", "numbers"]
    assert list(loaded["lines"]) == ["a", "b", ""]
    assert list(loaded["frame"]["review"]) == ["good", "bad"]
    assert [str(s) for s in loaded["frame"]["score"]] == ["great", "other"]
    assert list(read_r_lazyload(data_dir, ["numbers"])) == ["numbers"]
    with pytest.raises(MergeError, match="no object 'missing'"):
        read_r_lazyload(data_dir, ["missing"])


# ---------------------------------------------------------------------------------------------------------
# loaders


def test_read_fortunes_splits_and_normalizes(tmp_path):
    path = tmp_path / "f"
    path.write_text("first  line\nsecond line\n%\n\n%\nthird\n%\n")
    assert t8.read_fortunes(path) == ["first line second line", "third"]


def test_fortune_topic(tmp_path):
    base = tmp_path / "fortunes" / t8.FORTUNE_DIR
    for category in t8.FORTUNE_TOPICS:
        write_fortunes(base / category, [*sentences(category, 5), "short", "x" * 600])
    write_fortunes(base / "computers", [*sentences("computers", 5), "Same text in two files, so dropped."])
    write_fortunes(base / "politics", [*sentences("politics", 5), "Same text in two files, so dropped."])
    task = t8.fortune_topic(tmp_path / "fortunes")
    assert task.label_names == list(t8.FORTUNE_TOPICS)
    assert task.class_counts() == dict.fromkeys(t8.FORTUNE_TOPICS, 5)
    assert all(t8.FORTUNE_MIN_CHARS <= len(text) <= t8.FORTUNE_MAX_CHARS for text in task.texts)
    assert task.texts == sorted(task.texts)
    for text, label in zip(task.texts, task.labels):
        assert text.startswith(task.label_names[label])
    with pytest.raises(MergeError, match="'songs-poems'"):
        t8.fortune_topic(tmp_path / "fortunes", ["songs-poems"])


def test_language(tmp_path):
    roots = {}
    for label, package, folder in t8.LANGUAGE_SOURCES:
        roots[package] = tmp_path / package
        name = f"{package}-jokes"
        write_fortunes(roots[package] / folder / name, sentences(f"{label} {package}", 3))
    de = roots["fortunes-de"] / t8.FORTUNE_DIR / "de"
    (de / "fortunes-de-jokes.u8").symlink_to("fortunes-de-jokes")
    write_fortunes(de / "asciiart", sentences("de art", 3))  # skipped: not prose
    write_fortunes(de / "latin1", ["Grüße aus Köln, eine längere Zeile."], encoding="latin-1")
    (roots["fortunes-pl"] / t8.FORTUNE_DIR / "pl" / "fortunes-pl-jokes.u8").write_bytes(b"")  # empty copy
    it_top = roots["fortunes-it"] / t8.FORTUNE_DIR
    (it_top / "link-to-it").symlink_to("it/fortunes-it-jokes")  # top-level symlink like fortunes-it ships
    write_fortunes(roots["fortunes-es"] / t8.FORTUNE_DIR / "es" / "off" / "varios", sentences("es off", 3))

    task = t8.language(roots)
    assert task.label_names == ["en", "de", "es", "ru", "it", "pl", "cs", "pt-br"]
    counts = task.class_counts()
    assert counts == {"en": 6, "de": 4, "es": 3, "ru": 3, "it": 3, "pl": 3, "cs": 3, "pt-br": 3}
    assert "Grüße aus Köln, eine längere Zeile." in task.texts
    assert not any(text.startswith(("de art", "es off")) for text in task.texts)
    with pytest.raises(MergeError, match="fortunes-br"):
        t8.language({k: v for k, v in roots.items() if k != "fortunes-br"})


WORDNET_HEADER = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton  \n"
)


def wordnet_line(offset: int, lex: int, ss_type: str, word: str, gloss: str) -> str:
    return f"{offset:08d} {lex:02d} {ss_type} 01 {word} 0 001 @ 00001740 {ss_type} 0000 | {gloss}  \n"


def write_wordnet(root: Path) -> None:
    folder = root / t8.WORDNET_DIR
    folder.mkdir(parents=True)
    nouns = [
        wordnet_line(1, 18, "n", "teacher", 'a person whose occupation is teaching; "the teacher spoke"'),
        wordnet_line(2, 18, "n", "cook", "someone who cooks food for a living"),
        wordnet_line(3, 18, "n", "pilot", 'a person qualified to guide ships; "the pilot was late"'),
        wordnet_line(4, 5, "n", "dog", "a member of the genus Canis"),
        wordnet_line(5, 5, "n", "cat", "feline mammal usually having thick soft fur"),
        wordnet_line(6, 6, "n", "hammer", "a hand tool with a heavy rigid head"),
        wordnet_line(7, 4, "n", "x", "tiny"),  # too short: dropped
    ]
    verbs = [
        wordnet_line(11, 38, "v", "run", "move fast by using one's feet; \"Don't run--you'll be late\""),
        wordnet_line(12, 38, "v", "walk", "use one's feet to advance"),
        wordnet_line(13, 32, "v", "say", "express in words"),
    ]
    adjs = [
        wordnet_line(21, 0, "a", "able", "having the necessary means or skill"),
        wordnet_line(22, 0, "s", "quick", "accomplished rapidly and without delay"),
        wordnet_line(23, 0, "a", "same", "a member of the genus Canis"),  # conflicts with a noun: dropped
    ]
    advs = [wordnet_line(31, 2, "r", "quickly", 'with rapid movements; "he works quickly"')]
    for pos, lines in {"noun": nouns, "verb": verbs, "adj": adjs, "adv": advs}.items():
        (folder / f"data.{pos}").write_text(WORDNET_HEADER + "".join(lines))


def test_wordnet_lexnames_order():
    assert len(t8.WORDNET_LEXNAMES) == 45
    assert t8.WORDNET_LEXNAMES[5] == "noun.animal"
    assert t8.WORDNET_LEXNAMES[18] == "noun.person"
    assert t8.WORDNET_LEXNAMES[38] == "verb.motion"
    assert t8.WORDNET_LEXNAMES[44] == "adj.ppl"


def test_wordnet_definition_strips_examples():
    assert (
        t8.wordnet_definition('a person who teaches; "she is a teacher"; "another"') == "a person who teaches"
    )
    assert t8.wordnet_definition("express in words") == "express in words"


def test_noun_and_verb_category(tmp_path):
    write_wordnet(tmp_path)
    nouns = t8.noun_category(tmp_path, n_classes=2)
    assert nouns.label_names == ["noun.animal", "noun.person"]  # the two largest, sorted
    assert nouns.class_counts() == {"noun.animal": 2, "noun.person": 3}
    assert "a person whose occupation is teaching" in nouns.texts
    assert not any("teacher" in text or '"' in text for text in nouns.texts)  # no word, no examples
    verbs = t8.verb_category(tmp_path)
    assert verbs.class_counts() == {"verb.communication": 1, "verb.motion": 2}
    assert "move fast by using one's feet" in verbs.texts


def test_gloss_pos(tmp_path):
    write_wordnet(tmp_path)
    task = t8.gloss_pos(tmp_path)
    assert task.label_names == ["noun", "verb", "adj", "adv"]
    assert task.class_counts() == {"noun": 5, "verb": 3, "adj": 2, "adv": 1}
    assert "a member of the genus Canis" not in task.texts  # noun and adj: conflicting labels, dropped


def r_package_root(tmp_path: Path, package: str, objects: dict[str, object]) -> Path:
    root = tmp_path / f"r-cran-{package}"
    write_lazyload(root / t8.R_LIBRARY / package / "data", objects, tmp_path)
    return root


def test_sentiment(tmp_path):
    training = pd.DataFrame(
        {
            "product": strings(["p1", "p2", "p3"]),
            "review": strings(["Great taste!<br />Buy it.", "Stale &amp; bland.", "Great taste! Buy it."]),
            "score": pd.Categorical(["great", "other", "great"]),
        }
    )
    testing = pd.DataFrame(
        {"product": strings(["p4"]), "review": strings(["Fine."]), "score": pd.Categorical(["other"])}
    )
    root = r_package_root(tmp_path, "modeldata", {"training_data": training, "testing_data": testing})
    task = t8.sentiment(root)
    assert task.label_names == ["other", "great"]
    pairs = dict(zip(task.texts, task.labels))
    assert pairs == {"Great taste! Buy it.": 1, "Stale & bland.": 0, "Fine.": 0}  # <br /> cleaned, deduped


def test_austen(tmp_path):
    def novel(title: str, n: int) -> np.ndarray:
        body = [f"{title} line {i}" if i % 5 else "" for i in range(n)]
        return np.array([title.upper(), "By Jane Austen", "", "CHAPTER I", "", *body, "Chapter 2", *body[:3]])

    objects = {name: novel(name, 20 + 5 * i) for i, name in enumerate(t8.AUSTEN_NOVELS)}
    task = t8.austen(r_package_root(tmp_path, "janeaustenr", objects))
    assert task.label_names == list(t8.AUSTEN_NOVELS.values())
    # novel i has 20 + 5i body lines, a fifth of them blank, plus 2 lines after the second heading
    expected = [(16 + 4 * i + 2) // 4 for i in range(6)]
    assert list(task.class_counts().values()) == expected
    for text, label in zip(task.texts, task.labels):
        name = list(t8.AUSTEN_NOVELS)[label]
        assert text.startswith(f"{name} line") and "CHAPTER" not in text.upper()
        assert text.count(" line ") == t8.AUSTEN_CHUNK_LINES


def test_tweet_device(tmp_path):
    tweets = pd.DataFrame(
        {
            "source": strings(
                ["Twitter for Android", "Twitter for iPhone", "Twitter Web Client", "Twitter for iPhone"]
            ),
            "text": strings(
                ["Crooked media &amp; polls!", "Join me in Ohio! https://t.co/x", "From the web", "RT @a: hi"]
            ),
            "is_retweet": np.array([False, False, False, False]),
        }
    )
    extra = pd.DataFrame(
        {
            "source": strings(["Twitter for Android"]),
            "text": strings(["A retweet"]),
            "is_retweet": np.array([True]),
        }
    )
    tweets = pd.concat([tweets, extra], ignore_index=True)
    task = t8.tweet_device(r_package_root(tmp_path, "dslabs", {"trump_tweets": tweets}))
    assert task.label_names == ["android", "iphone"]
    assert dict(zip(task.texts, task.labels)) == {
        "Crooked media & polls!": 0,
        "Join me in Ohio! https://t.co/x": 1,
    }


def test_registry():
    assert t8.TASKS == (
        "sentiment", "fortune_topic", "language", "noun_category",
        "verb_category", "austen", "tweet_device", "gloss_pos",
    )  # fmt: skip
    assert "fortunes-br" in t8.task_packages("language")
    with pytest.raises(MergeError, match="unknown text8 task"):
        t8.load_task("nope")


# ---------------------------------------------------------------------------------------------------------
# splits


def toy_task(sizes: list[int], duplicates: int = 0) -> t8.TaskData:
    texts, labels = [], []
    for label, size in enumerate(sizes):
        for i in range(size):
            texts.append(f"class {label} example {i}")
            labels.append(label)
    for i in range(duplicates):  # exact duplicates of existing texts
        texts.append(f"class 0 example {i}")
        labels.append(0)
    return t8.TaskData("toy", texts, labels, [f"c{i}" for i in range(len(sizes))], "test")


def test_build_task_dedupes_and_drops_conflicts():
    task = t8.build_task(
        "t",
        [("b  text", "x"), ("a", "y"), ("b text", "x"), ("c", "x"), ("c", "y"), (" ", "x")],
        ["x", "y"],
        "s",
    )
    assert task.texts == ["a", "b text"]
    assert task.labels == [1, 0]


def test_make_splits_sizes_stratified_disjoint():
    task = toy_task([200, 200, 200], duplicates=50)
    splits = t8.make_splits(task, seed=0, n_train=90, n_val=30, n_test=61)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [90, 30, 61]
    assert splits["train"].class_counts() == {"c0": 30, "c1": 30, "c2": 30}
    assert splits["test"].class_counts() == {"c0": 21, "c1": 20, "c2": 20}
    seen = [set(split.texts) for split in splits.values()]
    assert all(len(s) == len(split) for s, split in zip(seen, splits.values()))  # no duplicates inside
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    for split in splits.values():
        for text, label in zip(split.texts, split.labels):
            assert text.startswith(f"class {label} ")


def test_make_splits_deterministic():
    task = toy_task([100, 80])
    a = t8.make_splits(task, seed=7, n_train=40, n_val=20, n_test=40)
    shuffled = t8.TaskData("toy", task.texts[::-1], task.labels[::-1], task.label_names, "test")
    b = t8.make_splits(shuffled, seed=7, n_train=40, n_val=20, n_test=40)
    assert all(a[s].texts == b[s].texts and a[s].labels == b[s].labels for s in a)
    c = t8.make_splits(task, seed=8, n_train=40, n_val=20, n_test=40)
    assert a["test"].texts != c["test"].texts
    d = t8.make_splits(task, seed=7, n_train=10, n_val=5, n_test=40)
    assert sorted(d["test"].texts) == sorted(a["test"].texts)  # test does not depend on train/val sizes


def test_make_splits_short_class_keeps_test_full():
    task = toy_task([100, 30])
    splits = t8.make_splits(task, seed=1, n_train=100, n_val=20, n_test=40)
    assert splits["test"].class_counts() == {"c0": 20, "c1": 20}
    assert splits["validation"].class_counts() == {"c0": 10, "c1": 10}
    assert splits["train"].class_counts() == {"c0": 50, "c1": 0}
