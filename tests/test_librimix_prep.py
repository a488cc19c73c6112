"""Tests of umamba.data.librimix on a tiny synthetic corpus in the exact Libri2Mix layout."""

import csv
import os

import numpy as np
import pytest
import soundfile as sf
from speechbrain.dataio.dataset import DynamicItemDataset

from umamba.data.librimix import (
    LibriMixFormatError,
    LibriMixNotFoundError,
    metadata_path,
    prepare_librimix,
)

SPLITS = ("train-360", "dev", "test")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _rewrite_metadata(path, transform):
    """Rewrites a metadata CSV with ``transform(header, rows) -> (header, rows)`` on raw rows."""
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    header, rows = transform(table[0], table[1:])
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)


def test_csvs_match_the_corpus(corpus, tmp_path):
    csvs = prepare_librimix(str(corpus), str(tmp_path))
    assert sorted(csvs) == sorted(SPLITS)
    libri2mix = corpus / "Libri2Mix"
    for split, path in csvs.items():
        assert os.path.basename(path) == f"{split}_mix_both_8000_min.csv"
        rows = _read_csv(path)
        metadata = _read_csv(metadata_path(str(libri2mix), 8000, "min", split, "mix_both"))
        assert list(rows[0]) == ["ID", "duration", "mix_wav", "s1_wav", "s2_wav", "noise_wav"]
        ids = [row["ID"] for row in rows]
        assert ids == sorted(ids) == sorted(m["mixture_ID"] for m in metadata)
        lengths = {m["mixture_ID"]: int(m["length"]) for m in metadata}
        for row in rows:
            assert row["mix_wav"] == f"$data_root/wav8k/min/{split}/mix_both/{row['ID']}.wav"
            assert row["noise_wav"] == f"$data_root/wav8k/min/{split}/noise/{row['ID']}.wav"
            # the real duration, from the metadata length and equal to the file's
            assert float(row["duration"]) == pytest.approx(lengths[row["ID"]] / 8000, abs=1e-6)
            mix = row["mix_wav"].replace("$data_root", str(libri2mix))
            assert sf.info(mix).frames == lengths[row["ID"]]
    data = DynamicItemDataset.from_csv(csvs["dev"], replacements={"data_root": str(libri2mix)})
    for item in data.data.values():
        for key in ("mix_wav", "s1_wav", "s2_wav", "noise_wav"):
            assert os.path.isfile(item[key])


def test_both_metadata_schemas_and_untrusted_paths(corpus_copy, tmp_path):
    reference = prepare_librimix(str(corpus_copy), str(tmp_path / "a"), splits=["dev"])["dev"]
    metadata = metadata_path(str(corpus_copy / "Libri2Mix"), 8000, "min", "dev", "mix_both")

    def add_original_id_and_foreign_paths(header, rows):
        header = header[:1] + ["original_mixture_ID"] + header[1:]
        rows = [
            row[:1] + ["orig_" + row[0]] + ["/data/elsewhere/x.wav"] * (len(row) - 2) + row[-1:]
            for row in sorted(rows, reverse=True)  # unsorted, whatever the generated order
        ]
        return header, rows

    _rewrite_metadata(metadata, add_original_id_and_foreign_paths)
    rewritten = prepare_librimix(str(corpus_copy), str(tmp_path / "b"), splits=["dev"])["dev"]
    with open(reference) as f, open(rewritten) as g:
        assert f.read() == g.read()


def test_data_folder_can_be_the_libri2mix_folder(corpus, tmp_path):
    direct = prepare_librimix(str(corpus / "Libri2Mix"), str(tmp_path / "a"), splits=["test"])
    parent = prepare_librimix(str(corpus), str(tmp_path / "b"), splits=["test"])
    with open(direct["test"]) as f, open(parent["test"]) as g:
        assert f.read() == g.read()


def test_mixture_types(corpus, tmp_path):
    clean = prepare_librimix(str(corpus), str(tmp_path), splits=["dev"], mixture_type="mix_clean")
    assert list(_read_csv(clean["dev"])[0]) == ["ID", "duration", "mix_wav", "s1_wav", "s2_wav"]
    single = prepare_librimix(str(corpus), str(tmp_path), splits=["dev"], mixture_type="mix_single")
    row = _read_csv(single["dev"])[0]
    assert row["mix_wav"].startswith("$data_root/wav8k/min/dev/mix_single/")
    assert "noise_wav" in row


def test_idempotent_and_rewritten_when_options_or_metadata_change(corpus_copy, tmp_path):
    save = str(tmp_path / "csv")
    path = prepare_librimix(str(corpus_copy), save, splits=["dev"])["dev"]
    first = os.stat(path).st_mtime_ns
    os.utime(path, ns=(first - 10**9, first - 10**9))  # so that a rewrite is visible
    assert prepare_librimix(str(corpus_copy), save, splits=["dev"])["dev"] == path
    assert os.stat(path).st_mtime_ns == first - 10**9
    # a changed option that keeps the CSV name writes the same CSV again, differently
    prepare_librimix(str(corpus_copy), save, splits=["dev"], noise_folder="s2")
    assert os.stat(path).st_mtime_ns != first - 10**9
    assert "/s2/" in _read_csv(path)[0]["noise_wav"]
    # other targets get a CSV of their own, named after them (no overwriting)
    swapped = prepare_librimix(str(corpus_copy), save, splits=["dev"], source_folders=["s2", "s1"])["dev"]
    assert os.path.basename(swapped) == "dev_mix_both-s2-s1_8000_min.csv"
    assert "/s2/" in _read_csv(swapped)[0]["s1_wav"]
    os.remove(swapped)
    os.remove(swapped + ".json")
    # a touched metadata file rewrites it too
    prepare_librimix(str(corpus_copy), save, splits=["dev"])
    os.utime(path, ns=(first - 10**9, first - 10**9))
    metadata = metadata_path(str(corpus_copy / "Libri2Mix"), 8000, "min", "dev", "mix_both")
    os.utime(metadata, ns=(first + 10**9, first + 10**9))
    prepare_librimix(str(corpus_copy), save, splits=["dev"])
    assert os.stat(path).st_mtime_ns != first - 10**9
    assert sorted(os.listdir(save)) == [os.path.basename(path), os.path.basename(path) + ".json"]


def test_skip_prep_writes_nothing(corpus, tmp_path):
    csvs = prepare_librimix("nowhere", str(tmp_path / "out"), splits=["dev"], skip_prep=True)
    assert csvs == {"dev": str(tmp_path / "out" / "dev_mix_both_8000_min.csv")}
    assert not (tmp_path / "out").exists()


def test_missing_folders_list_what_exists(corpus, tmp_path):
    with pytest.raises(LibriMixNotFoundError) as info:
        prepare_librimix(str(corpus), str(tmp_path), sample_rate=16000)
    assert "No Libri2Mix/wav16k/min under" in str(info.value) and "wav8k" in str(info.value)
    with pytest.raises(LibriMixNotFoundError) as info:
        prepare_librimix(str(corpus), str(tmp_path), splits=["dev"], mix_folder="mix_both_reverb")
    message = str(info.value)
    assert "No Libri2Mix/wav8k/min/dev/mix_both_reverb under" in message
    assert "mix_both, mix_clean, mix_single, noise, s1, s2" in message
    with pytest.raises(FileNotFoundError) as info:
        prepare_librimix(str(tmp_path / "nothing"), str(tmp_path))
    assert "nothing" in str(info.value)


def test_missing_metadata_and_source_file(corpus_copy, tmp_path):
    libri2mix = corpus_copy / "Libri2Mix"
    metadata = metadata_path(str(libri2mix), 8000, "min", "test", "mix_both")
    mixture_id = _read_csv(metadata)[0]["mixture_ID"]
    missing = libri2mix / "wav8k" / "min" / "test" / "s2" / f"{mixture_id}.wav"
    missing.unlink()
    with pytest.raises(LibriMixNotFoundError) as info:
        prepare_librimix(str(corpus_copy), str(tmp_path), splits=["test"])
    assert mixture_id in str(info.value) and str(missing) in str(info.value)
    metadata = metadata_path(str(libri2mix), 8000, "min", "dev", "mix_both")
    os.remove(metadata)
    with pytest.raises(LibriMixNotFoundError, match="mixture_dev_mix_both.csv"):
        prepare_librimix(str(corpus_copy), str(tmp_path), splits=["dev"])


def test_wrong_sample_rate_is_named(corpus_copy, tmp_path):
    folder = corpus_copy / "Libri2Mix" / "wav8k" / "min" / "dev" / "s1"
    wrong = sorted(folder.iterdir())[-1]
    sf.write(wrong, np.zeros(16000), 16000)
    with pytest.raises(LibriMixFormatError) as info:
        prepare_librimix(str(corpus_copy), str(tmp_path), splits=["dev"])
    assert str(wrong) in str(info.value) and "16000 Hz" in str(info.value)


def test_malformed_metadata_row_is_named(corpus_copy, tmp_path):
    metadata = metadata_path(str(corpus_copy / "Libri2Mix"), 8000, "min", "dev", "mix_both")
    _rewrite_metadata(metadata, lambda header, rows: (header, rows[:1] + [rows[1][:-1]]))
    with pytest.raises(LibriMixFormatError) as info:
        prepare_librimix(str(corpus_copy), str(tmp_path), splits=["dev"])
    message = str(info.value)
    assert metadata in message and "line 3" in message and "length" in message
    _rewrite_metadata(metadata, lambda header, rows: (header[1:], [row[1:] for row in rows]))
    with pytest.raises(LibriMixFormatError, match="no column mixture_ID"):
        prepare_librimix(str(corpus_copy), str(tmp_path), splits=["dev"])
