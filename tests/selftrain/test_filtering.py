"""Pure functions of pseudo-label filtering: confidence/entropy, the ignore-label threshold, case selection."""
import numpy as np
import pytest

from nnunet_ssl.selftrain import SelfTrainingError, apply_confidence_threshold, confidence_and_entropy, select_cases
from nnunet_ssl.selftrain.common import check_fraction, parse_folds
from nnunet_ssl.selftrain.pseudolabel import class_names_from_dataset_json, summarize_case, voxel_volume_mm3
from nnunet_ssl.selftrain.selftrain import ignore_label_for


def test_confidence_and_entropy_extremes():
    k = 4
    uniform = np.full((k, 3, 5), 1 / k, np.float32)
    onehot = np.zeros((k, 3, 5), np.float32)
    onehot[2] = 1
    conf, ent = confidence_and_entropy(uniform)
    np.testing.assert_allclose(conf, 1 / k, rtol=1e-6)
    np.testing.assert_allclose(ent, 1.0, rtol=1e-5)
    conf, ent = confidence_and_entropy(onehot)
    np.testing.assert_allclose(conf, 1.0)
    np.testing.assert_allclose(ent, 0.0, atol=1e-6)
    assert conf.dtype == ent.dtype == np.float32


def test_confidence_and_entropy_values_and_regions():
    p = np.array([0.7, 0.2, 0.1], np.float32).reshape(3, 1, 1)
    conf, ent = confidence_and_entropy(p)
    expected = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1)) / np.log(3)
    assert conf[0, 0] == pytest.approx(0.7) and ent[0, 0] == pytest.approx(expected, rel=1e-5)
    # regions: the least certain binary decision, mean binary entropy
    r = np.array([0.9, 0.4], np.float32).reshape(2, 1, 1)
    conf, ent = confidence_and_entropy(r, has_regions=True)
    h = lambda q: -(q * np.log(q) + (1 - q) * np.log(1 - q)) / np.log(2)  # noqa: E731
    assert conf[0, 0] == pytest.approx(0.6) and ent[0, 0] == pytest.approx((h(0.9) + h(0.4)) / 2, rel=1e-5)


def test_threshold_turns_exactly_the_low_confidence_voxels_into_ignore():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 3, (6, 7, 8)).astype(np.uint8)
    conf = rng.uniform(0.34, 1.0, seg.shape).astype(np.float32)
    conf[0, 0, :3] = np.float32(0.9)  # exactly at the threshold: confident, kept
    out = apply_confidence_threshold(seg, conf, 0.9, ignore_label=3)
    low = conf < 0.9
    assert low.any() and (~low).any()
    assert np.array_equal(out[low], np.full(low.sum(), 3))
    assert np.array_equal(out[~low], seg[~low])
    assert np.array_equal(out[0, 0, :3], seg[0, 0, :3])
    assert out.dtype == np.uint8 and seg.max() < 3  # the input is not modified
    assert np.array_equal(apply_confidence_threshold(seg, conf, 0.0, None), seg)
    with pytest.raises(SelfTrainingError, match="shape"):
        apply_confidence_threshold(seg, conf[:-1], 0.9, 3)


def test_ignore_label_is_added_above_the_highest_label():
    labels = {"background": 0, "organ": 1, "lesion": 2}
    assert ignore_label_for(labels, 0.9) == 3
    assert ignore_label_for(labels, 0.0) is None  # no voxel filtering: the dataset stays ignore-free
    assert ignore_label_for({**labels, "ignore": 3}, 0.0) == 3
    assert ignore_label_for({"background": 0, "whole": [1, 2, 3], "core": [2, 3]}, 0.5) == 4


def test_select_cases_by_foreground_confidence():
    s = {"a": {"foreground_confidence": 0.95}, "b": {"foreground_confidence": 0.5},
         "c": {"foreground_confidence": None}, "d": {"foreground_confidence": 0.8}}
    kept, dropped = select_cases(s, 0.8)
    assert kept == ["a", "d"]
    assert set(dropped) == {"b", "c"} and "0.5" in dropped["b"] and "no foreground" in dropped["c"]
    assert select_cases(s, 0.0) == (["a", "b", "c", "d"], {})


def test_summarize_case_statistics():
    seg = np.array([[[0, 1, 1, 2]]], np.uint8)
    conf = np.array([[[1.0, 0.95, 0.6, 0.5]]], np.float32)
    ent = np.zeros_like(conf)
    s = summarize_case(seg, conf, ent, 0.9, {1: "organ", 2: "lesion"}, (2.0, 1.0, 0.5))
    assert s["mean_confidence"] == pytest.approx(np.mean(conf))
    assert s["fraction_confident"] == pytest.approx(0.5)
    assert s["foreground_voxels"] == 3 and s["foreground_confidence"] == pytest.approx((0.95 + 0.6 + 0.5) / 3)
    assert s["foreground_fraction_confident"] == pytest.approx(1 / 3)
    assert s["volume_per_class"] == {"lesion": {"label": 2, "voxels": 1, "volume_mm3": 1.0},
                                     "organ": {"label": 1, "voxels": 2, "volume_mm3": 2.0}}
    empty = summarize_case(np.zeros_like(seg), conf, ent, 0.9, {1: "organ"}, (1, 1, 1))
    assert empty["foreground_confidence"] is None and empty["volume_per_class"]["organ"]["voxels"] == 0
    assert voxel_volume_mm3((999.0, 0.5, 0.5)) == 0.25  # nnU-Net's 2D dummy spacing is left out


def test_class_names_plain_and_regions():
    assert class_names_from_dataset_json({"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}}) == \
        {1: "a", 2: "b"}
    dj = {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2]}
    assert class_names_from_dataset_json(dj) == {1: "whole", 2: "core"}


@pytest.mark.parametrize("value", [-0.1, 1.5, "x", float("nan")])
def test_fractions_outside_unit_interval_are_refused(value):
    with pytest.raises(SelfTrainingError, match="--threshold"):
        check_fraction(value, "--threshold")


def test_parse_folds():
    assert parse_folds(["0", "2"]) == (0, 2) and parse_folds(["all"]) == ("all",) and parse_folds(None) is None
    with pytest.raises(SelfTrainingError, match="fold 'x'"):
        parse_folds(["x"])
    with pytest.raises(SelfTrainingError, match="repeats"):
        parse_folds([0, 0])


@pytest.mark.parametrize("rw_name,ending", [("SimpleITKIO", ".nii.gz"), ("SimpleITKIO", ".mha"),
                                             ("NibabelIO", ".nii.gz"), ("NibabelIOWithReorient", ".nii.gz"),
                                             ("Tiff3DIO", ".tif"), ("NaturalImage2DIO", ".png")])
def test_float_maps_round_trip_in_every_nnunet_image_format(tmp_path, rw_name, ending):
    """Confidence maps are written with the image's geometry by every nnU-Net reader/writer and read back."""
    import json as _json

    import SimpleITK as sitk
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    from nnunet_ssl.selftrain.pseudolabel import map_encoding, read_map, write_map

    rw = recursive_find_reader_writer_by_name(rw_name)
    rng = np.random.default_rng(1)
    shape = (1, 12, 10) if ending == ".png" else (5, 12, 10)
    image = tmp_path / f"img_0000{ending}"
    if ending == ".png":
        from skimage import io as skio
        skio.imsave(str(image), rng.integers(0, 255, shape[1:]).astype(np.uint8), check_contrast=False)
    elif ending == ".tif":
        import tifffile
        tifffile.imwrite(str(image), rng.normal(size=shape).astype(np.float32))
        (tmp_path / "img.json").write_text(_json.dumps({"spacing": [2.0, 1.0, 0.5]}))
    else:
        im = sitk.GetImageFromArray(rng.normal(size=shape).astype(np.float32))
        im.SetSpacing((0.5, 1.0, 2.0))
        im.SetOrigin((3.0, -2.0, 1.0))
        sitk.WriteImage(im, str(image))
    data, props = rw().read_images([str(image)])
    values = rng.uniform(0.34, 1.0, data.shape[1:]).astype(np.float32)
    out = tmp_path / f"map{ending}"
    write_map(rw, values, str(out), props)
    back, back_props = read_map(rw, str(out), map_encoding(rw))
    assert back.shape == values.shape and back.dtype == np.float32
    tol = 5e-4 if map_encoding(rw) == "uint16_per_mille" else 1e-7
    np.testing.assert_allclose(back, values, atol=tol)
    np.testing.assert_allclose(back_props["spacing"], props["spacing"])
