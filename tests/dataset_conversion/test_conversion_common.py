"""Shared converter machinery: atomic writing, overwrite refusal, id clashes, selection, image geometry."""
import json

import numpy as np
import pytest

from nnunet_ssl.dataset_conversion import CONVERTERS
from nnunet_ssl.dataset_conversion import _common as C


def test_every_converter_module_has_main():
    import importlib

    assert set(CONVERTERS) == {"acdc", "acdc-h5", "la-h5", "msd", "add-unlabeled"}
    for name, module in CONVERTERS.items():
        mod = importlib.import_module(f"nnunet_ssl.dataset_conversion.{module}")
        assert callable(mod.main), name
        with pytest.raises(SystemExit) as e:  # argparse --help exits 0 and names the CLI
            mod.main(["--help"])
        assert e.value.code == 0


def test_atomic_folder_renames_only_on_success(tmp_path):
    with C.atomic_dataset_folder(tmp_path, "Dataset010_A", overwrite=False) as tmp:
        (tmp / "x.txt").write_text("done")
        assert not (tmp_path / "Dataset010_A").exists()  # nothing visible while writing
    assert (tmp_path / "Dataset010_A" / "x.txt").read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset010_A"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_folder_leaves_nothing_on_failure(tmp_path, exc):
    with pytest.raises(type(exc)):
        with C.atomic_dataset_folder(tmp_path, "Dataset010_A", overwrite=False) as tmp:
            (tmp / "half.txt").write_text("half")
            raise exc
    assert list(tmp_path.iterdir()) == []


def test_overwrite_keeps_old_dataset_until_new_one_is_complete(tmp_path):
    old = tmp_path / "Dataset010_A"
    old.mkdir()
    (old / "old.txt").write_text("old")
    with pytest.raises(C.ConversionError, match="already exists.*--overwrite"):
        with C.atomic_dataset_folder(tmp_path, "Dataset010_A", overwrite=False):
            pass
    with pytest.raises(RuntimeError):
        with C.atomic_dataset_folder(tmp_path, "Dataset010_A", overwrite=True):
            raise RuntimeError("interrupted")
    assert (old / "old.txt").read_text() == "old"  # a failed overwrite keeps the old dataset
    with C.atomic_dataset_folder(tmp_path, "Dataset010_A", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in old.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset010_A"]


def test_dataset_id_clash_is_refused_even_with_overwrite(tmp_path, monkeypatch):
    (tmp_path / "Dataset010_Other").mkdir()
    with pytest.raises(C.ConversionError, match="id 010 is already used by .*Dataset010_Other"):
        C.check_target(tmp_path, "Dataset010_A", overwrite=True)
    pre = tmp_path / "pre"
    (pre / "Dataset011_Else").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))
    with pytest.raises(C.ConversionError, match="Dataset011_Else"):
        C.check_target(tmp_path, "Dataset011_A", overwrite=False)


@pytest.mark.parametrize("did,name,msg", [(0, "A", "out of range"), (1000, "A", "out of range"),
                                          (5, "bad name", "not allowed")])
def test_bad_dataset_id_or_name(did, name, msg):
    with pytest.raises(C.ConversionError, match=msg):
        C.dataset_folder_name(did, name)


def test_output_root_needs_nnunet_raw_or_option(tmp_path, monkeypatch):
    with pytest.raises(C.ConversionError, match="nnUNet_raw"):
        C.resolve_output_root(None)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    assert C.resolve_output_root(None) == (tmp_path / "raw").resolve()


def test_seeded_choice_is_reproducible_and_seed_dependent():
    cases = [f"c{i:02d}" for i in range(30)]
    a = C.seeded_choice(cases, 5, seed=1)
    assert a == C.seeded_choice(list(reversed(cases)), 5, seed=1)  # independent of input order
    assert a == sorted(a) and len(set(a)) == 5
    assert a != C.seeded_choice(cases, 5, seed=2)


@pytest.mark.parametrize("n,frac,msg", [(0, None, "out of range"), (11, None, "out of range"),
                                        (None, 0.0, "fraction"), (None, 1.5, "fraction"), (None, None, "say how many")])
def test_resolve_num_labeled_errors(n, frac, msg):
    with pytest.raises(C.ConversionError, match=msg):
        C.resolve_num_labeled(n, frac, total=10)


def test_resolve_num_labeled_fraction_rounds_and_keeps_one():
    assert C.resolve_num_labeled(None, 0.25, total=10) == 2
    assert C.resolve_num_labeled(None, 0.01, total=10) == 1


def test_write_image_spacing_is_given_in_array_order(tmp_path, synth):
    a = np.zeros((2, 3, 4), np.float32)
    a[1, 2, 3] = 7
    C.write_image(a, tmp_path / "x.nii.gz", spacing=(5.0, 2.0, 0.5))
    img = synth.read(tmp_path / "x.nii.gz")
    assert img.GetSize() == (4, 3, 2)
    assert img.GetSpacing() == (0.5, 2.0, 5.0)
    assert img[3, 2, 1] == 7


def test_group_channel_files(tmp_path):
    for n in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", ".hidden_0000.nii.gz"):
        (tmp_path / n).write_bytes(b"")
    got = C.group_channel_files(tmp_path, ".nii.gz", 2)
    assert {k: [p.name for p in v] for k, v in got.items()} == {
        "a": ["a_0000.nii.gz", "a_0001.nii.gz"], "b": ["b_0000.nii.gz", "b_0001.nii.gz"]}
    (tmp_path / "b_0001.nii.gz").unlink()
    with pytest.raises(C.ConversionError, match=r"case 'b'.*channels \[0\], expected \[0, 1\]"):
        C.group_channel_files(tmp_path, ".nii.gz", 2)
    (tmp_path / "nochannel.nii.gz").write_bytes(b"")
    with pytest.raises(C.ConversionError, match="nochannel.nii.gz: name lacks"):
        C.group_channel_files(tmp_path, ".nii.gz", 2)


def test_build_dataset_failure_midway_leaves_nothing(tmp_path):
    def ok(image_paths, label_path):
        C.write_image(np.zeros((2, 2, 2), np.float32), image_paths[0], (1, 1, 1))
        if label_path:
            C.write_image(np.zeros((2, 2, 2), np.uint8), label_path, (1, 1, 1))

    def broken(image_paths, label_path):
        raise C.ConversionError("source file x is corrupt")

    jobs = [C.CaseJob("a", "labeled", ok), C.CaseJob("b", "unlabeled", ok), C.CaseJob("c", "unlabeled", broken)]
    with pytest.raises(C.ConversionError, match="corrupt"):
        C.build_dataset(root=tmp_path, folder_name="Dataset010_A", overwrite=False, jobs=jobs, num_channels=1,
                        file_ending=".nii.gz", keep_unlabeled_labels=False, record={},
                        dataset_json=dict(channel_names={0: "x"}, labels={"background": 0, "a": 1},
                                          dataset_name="A"))
    assert list(tmp_path.iterdir()) == []


def test_build_dataset_writes_nnunet_dataset_json_and_record(tmp_path, synth):
    def ok(image_paths, label_path):
        C.write_image(np.zeros((2, 2, 2), np.float32), image_paths[0], (1, 1, 1))
        if label_path:
            C.write_image(np.zeros((2, 2, 2), np.uint8), label_path, (1, 1, 1))

    jobs = [C.CaseJob("a", "labeled", ok), C.CaseJob("b", "unlabeled", ok), C.CaseJob("t", "test", ok)]
    out = C.build_dataset(root=tmp_path, folder_name="Dataset010_A", overwrite=False, jobs=jobs, num_channels=1,
                          file_ending=".nii.gz", keep_unlabeled_labels=True,
                          record=C.make_split_record(converter="x", source=None, dataset="Dataset010_A",
                                                     selection={"rule": "test"}),
                          dataset_json=dict(channel_names={0: "x"}, labels={"background": 0, "a": 1},
                                            dataset_name="A"))
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["numTraining"] == 1 and dj["numUnlabeled"] == 1 and dj["channel_names"] == {"0": "x"}
    assert dj["ssl_split"] == C.SPLIT_RECORD_FILENAME
    rec = json.loads((out / C.SPLIT_RECORD_FILENAME).read_text())
    assert (rec["labeled"], rec["unlabeled"], rec["test"]) == (["a"], ["b"], ["t"])
    assert rec["hidden_unlabeled_labels"] and (out / "labelsUnlabeledHidden" / "b.nii.gz").is_file()
    assert (out / "labelsTs" / "t.nii.gz").is_file() and rec["test_labels"]
    with pytest.raises(C.ConversionError, match="more than once"):
        C.build_dataset(root=tmp_path, folder_name="Dataset011_B", overwrite=False, jobs=jobs + jobs[:1],
                        num_channels=1, file_ending=".nii.gz", keep_unlabeled_labels=False, record={},
                        dataset_json={})


def test_tiff_spacing_side_file_travels_with_images_and_labels(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for n in ("c1_0000.tif", "c1.tif"):
        (src / n).write_bytes(b"tif")
    (src / "c1.json").write_text('{"spacing": [2, 1, 1]}')
    C.copy_nnunet_file(src / "c1_0000.tif", dst / "u_c1_0000.tif", ".tif", is_channel=True)
    C.copy_nnunet_file(src / "c1.tif", dst / "v.tif", ".tif", is_channel=False)
    assert sorted(p.name for p in dst.iterdir()) == ["u_c1.json", "u_c1_0000.tif", "v.json", "v.tif"]
    with pytest.raises(C.ConversionError, match="missing file: .*nope.tif"):
        C.copy_nnunet_file(src / "nope.tif", dst / "x.tif", ".tif", is_channel=False)
