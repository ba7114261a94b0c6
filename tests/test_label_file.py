"""``ingest --labels FILE``: a label file replaces the source's labels on train and val, the
source's stay for diagnostics; every bad file is one clear error and no store is written."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_ingest import make_folder

from swift_sampler.pipeline.ingest.build import IngestError, ingest
from swift_sampler.pipeline.ingest.label_file import LabelFileError
from swift_sampler.storage import StoreLayout, query, read_manifest

CLASSES = {"cat": 12, "dog": 12, "fox": 12}


@pytest.fixture()
def folder(tmp_path):
    return make_folder(tmp_path / "src", CLASSES)


def names(folder):
    return sorted(f"{c.name}/{f.name}" for c in folder.iterdir() for f in c.iterdir())


def write_csv(path, rows, header="path,label"):
    path.write_text("\n".join([header, *(f"{p},{lab}" for p, lab in rows)]) + "\n")
    return path


def relabelled(folder, every=3):
    """Every ``every``-th image of each class called by the next class's name."""
    classes = sorted(CLASSES)
    rows = []
    for i, name in enumerate(names(folder)):
        cls = name.split("/")[0]
        wrong = classes[(classes.index(cls) + 1) % len(classes)]
        rows.append((name, wrong if i % every == 0 else cls))
    return rows


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_label_file_replaces_train_and_val_labels_and_keeps_the_truth(folder, tmp_path, fmt):
    rows = relabelled(folder)
    if fmt == "csv":
        labels = write_csv(tmp_path / "labels.csv", rows)
    else:
        labels = tmp_path / "labels.parquet"
        pq.write_table(pa.table({"path": [p for p, _ in rows], "label": [lab for _, lab in rows]}), labels)
    store = tmp_path / "store"
    summary = ingest(f"imagefolder:{folder}", store, val_frac=0.25, test_frac=0.25, labels=labels,
                     shard_size=8, progress=False)
    manifest = read_manifest(StoreLayout(store))
    assert manifest["noise"]["kind"] == "labels" and len(manifest["noise"]["labels_sha256"]) == 64
    file_label = {p: sorted(CLASSES).index(lab) for p, lab in rows}
    table = query(store, "SELECT split, source, label, true_label, noisy FROM samples").to_pylist()
    for r in table:
        truth = sorted(CLASSES).index(r["source"].split("/")[0])
        assert r["true_label"] == truth
        if r["split"] == "test":  # the test split keeps the source's labels
            assert r["label"] == truth and not r["noisy"]
        else:
            assert r["label"] == file_label[r["source"]] and r["noisy"] == (r["label"] != truth)
    for split in ("train", "val"):
        part = [r for r in table if r["split"] == split]
        assert manifest["noise"]["realised"][split] == pytest.approx(np.mean([r["noisy"] for r in part]))
    assert summary["noise"]["spec"] == "labels:" + labels.name


@pytest.mark.parametrize("content, needle", [
    ("", "is empty"),
    ("path,label\n", "has no rows"),
    ("file,label\ncat/0.jpg,cat\n", "no column 'path'"),
    ("path,label\nNAME0,wolf\n", "row 1: class 'wolf' is not one of"),
    ("path,label\nNAME0,cat\nNAME0,dog\n", "row 2: path NAME0 is listed twice"),
    ("path,label\nbird/000.jpg,cat\n", "row 1: path 'bird/000.jpg' is not an image of the source"),
    ("path,label\nNAME0,cat\n", "has no row for 35 image(s)"),
    ("path,label\n" + "x" * 200_000 + ",cat\n", "line 2: not readable as CSV"),
])
def test_bad_label_files_are_refused_naming_file_and_row(folder, tmp_path, content, needle):
    first = names(folder)[0]
    labels = tmp_path / "labels.csv"
    labels.write_text(content.replace("NAME0", first))
    store = tmp_path / "store"
    with pytest.raises(LabelFileError) as e:
        ingest(f"imagefolder:{folder}", store, labels=labels, progress=False)
    assert str(labels) in str(e.value) and needle.replace("NAME0", repr(first)) in str(e.value)
    assert not store.exists()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_column_named_twice_is_refused_naming_it(folder, tmp_path, fmt):
    """``path,label,label``: which label is meant cannot be told (a CSV reader keeps the last)."""
    rows = relabelled(folder)
    if fmt == "csv":
        labels = tmp_path / "labels.csv"
        labels.write_text("\n".join(["path,label,label", *(f"{p},{lab},{p.split('/')[0]}"
                                                            for p, lab in rows)]) + "\n")
    else:
        labels = tmp_path / "labels.parquet"
        pq.write_table(pa.Table.from_arrays(
            [pa.array([p for p, _ in rows]), pa.array([lab for _, lab in rows]),
             pa.array([p.split("/")[0] for p, _ in rows])], names=["path", "label", "label"]), labels)
    store = tmp_path / "store"
    with pytest.raises(LabelFileError, match="column 'label' appears 2 times") as e:
        ingest(f"imagefolder:{folder}", store, labels=labels, progress=False)
    assert str(labels) in str(e.value)
    assert not store.exists()


def test_labels_and_noise_together_are_refused(folder, tmp_path):
    labels = write_csv(tmp_path / "labels.csv", relabelled(folder))
    with pytest.raises(IngestError, match="drop --noise"):
        ingest(f"imagefolder:{folder}", tmp_path / "store", labels=labels, noise="symmetric:0.2",
               progress=False)


def test_labels_from_the_command_line_and_sql_shows_the_diagnostics(folder, tmp_path, capsys):
    from swift_sampler.cli import main

    labels = write_csv(tmp_path / "labels.csv", relabelled(folder))
    store = tmp_path / "store"
    assert main(["pipeline", "ingest", "--source", f"imagefolder:{folder}", "--store", str(store),
                 "--labels", str(labels), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["noise"]["spec"].startswith("labels:")
    flipped = query(store, "SELECT avg(noisy::INT) AS r FROM samples WHERE split = 'train'").column("r")[0].as_py()
    assert 0.2 < flipped < 0.5
    assert main(["pipeline", "ingest", "--source", f"imagefolder:{folder}", "--store",
                 str(tmp_path / "s2"), "--labels", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_flat_folder_takes_its_classes_and_labels_from_the_file(folder, tmp_path):
    """Images with no class subfolders plus `path,label`: classes are the file's sorted names,
    each image keeps its row's label on every split, and nothing is marked noisy."""
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = []
    for name in names(folder):
        cls, file = name.split("/")
        (flat / f"{cls}-{file}").write_bytes((folder / name).read_bytes())
        rows.append((f"{cls}-{file}", cls.upper()))
    labels = write_csv(tmp_path / "labels.csv", rows[::-1])  # row order does not matter
    store = tmp_path / "store"
    ingest(f"imagefolder:{flat}", store, labels=labels, val_frac=0.2, test_frac=0.2, seed=0,
           progress=False)
    assert read_manifest(StoreLayout(store))["classes"] == ["CAT", "DOG", "FOX"]
    got = query(store, "SELECT source, label, true_label, noisy, split FROM samples").to_pylist()
    want = {file: ["CAT", "DOG", "FOX"].index(label) for file, label in rows}
    assert sorted(r["source"] for r in got) == sorted(want)
    assert all(r["label"] == r["true_label"] == want[r["source"]] and not r["noisy"] for r in got)
    assert {r["split"] for r in got} == {"train", "val", "test"}


def test_a_flat_folder_without_labels_or_with_an_unlabelled_image_is_refused(folder, tmp_path):
    from swift_sampler.pipeline.ingest.sources import SourceError

    flat = tmp_path / "flat"
    flat.mkdir()
    files = names(folder)
    for name in files:
        (flat / name.replace("/", "-")).write_bytes((folder / name).read_bytes())
    with pytest.raises(SourceError, match=r"no class subfolders: give their labels .*--labels FILE"):
        ingest(f"imagefolder:{flat}", tmp_path / "a", progress=False)
    partial = write_csv(tmp_path / "partial.csv",
                        [(n.replace("/", "-"), n.split("/")[0]) for n in files[1:]])
    with pytest.raises(LabelFileError, match=r"no row for 1 image\(s\) .*" + files[0].replace("/", "-")):
        ingest(f"imagefolder:{flat}", tmp_path / "b", labels=partial, progress=False)
    one_class = write_csv(tmp_path / "one.csv", [(n.replace("/", "-"), "cat") for n in files])
    with pytest.raises(LabelFileError, match="names 1 class"):
        ingest(f"imagefolder:{flat}", tmp_path / "c", labels=one_class, progress=False)
    assert not any((tmp_path / s).exists() for s in "abc")
