"""The ImageNet reader: the sorted-wnid class index, the three val layouts, the real sample in
../shared/data/imagenet-sample, the odd files real ImageNet holds (greyscale, CMYK, a PNG named
.JPEG), torchvision's evaluation protocol, and its errors (through the command line: the
``IMAGENET`` rows of bad_data.py, run by test_bad_data.py)."""

import importlib.util

import numpy as np
import pytest
import torch
from fakedata import solid, write_image, write_imagenet
from PIL import Image
from torchvision.transforms import v2

from data.core import DataError, DataOptions
from data.imagenet import imagenet_lists, load_imagenet
from data.images import decode_resized

#: Written in this (unsorted) order; the index is the sorted one: n01 < n02 < n03 < n04 < n05.
MAPPING = ["n05", "n02", "n04", "n01", "n03"]
TRAIN = {"n04": 2, "n02": 3}
VAL = {"n02": 1, "n04": 2}
LAYOUTS = ["folders", "kaggle"] + (["devkit"] if importlib.util.find_spec("scipy") else [])


def test_the_class_index_is_the_sorted_wnid_order_of_the_whole_mapping(tmp_path):
    write_imagenet(tmp_path / "imagenet", TRAIN, VAL, "folders", mapping=MAPPING)
    lists = imagenet_lists(tmp_path)  # <data-dir>/imagenet/ found
    assert lists.classes == ["class 01", "class 02", "class 03", "class 04", "class 05"]
    assert lists.train_labels == [1, 1, 1, 3, 3]  # n02 is index 1, n04 index 3, though only two are present
    assert [p.parent.name for p in lists.train_paths] == ["n02"] * 3 + ["n04"] * 2
    assert lists.test_labels == [1, 3, 3]


def test_without_a_mapping_the_classes_are_the_sorted_train_folders(tmp_path):
    write_imagenet(tmp_path / "ILSVRC2012", TRAIN, VAL, "folders")
    lists = imagenet_lists(tmp_path)
    assert (lists.classes, lists.train_labels, lists.test_labels) == (["n02", "n04"], [0, 0, 0, 1, 1], [0, 1, 1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_val_layout_gives_the_same_labels(tmp_path, layout):
    val = {"n01": 1, "n02": 2, "n03": 1}
    stems = write_imagenet(tmp_path, {"n01": 1, "n02": 1, "n03": 1}, val, layout)
    lists = imagenet_lists(tmp_path)  # --data-dir itself holding train/
    assert [p.stem for p in lists.test_paths] == list(stems)
    assert lists.test_labels == [0, 1, 1, 2]
    assert (
        lists.test_source
        == {
            "folders": "val/<wnid>/",
            "kaggle": "val/ labelled by LOC_val_solution.csv",
            "devkit": "val/ labelled by ILSVRC2012_validation_ground_truth.txt",
        }[layout]
    )


def test_the_shared_sample_gets_its_real_indices(shared_data):
    sample = shared_data / "imagenet-sample"
    lists = imagenet_lists(sample)
    wnids = [line.split()[0] for line in (sample / "LOC_synset_mapping.txt").read_text().splitlines()]
    assert len(lists.classes) == 1000 and lists.classes[0] == "tench" and wnids == sorted(wnids)
    assert (len(lists.train_paths), len(lists.test_paths)) == (48, 16)
    assert len(set(lists.train_labels)) == 48
    for path, label in zip(lists.train_paths, lists.train_labels, strict=False):
        assert wnids[label] == path.parent.name
    solution = dict(line.split(",")[:2] for line in (sample / "LOC_val_solution.csv").read_text().splitlines()[1:])
    for path, label in zip(lists.test_paths, lists.test_labels, strict=False):
        assert wnids[label] == solution[path.stem].split()[0]
    assert lists.test_labels[0] == wnids.index("n01968897")


def test_greyscale_cmyk_and_a_png_named_jpeg_load_as_rgb(tmp_path):
    colour = (200, 60, 30)
    grey = write_image(tmp_path / "grey.JPEG", solid(colour).convert("L"))
    cmyk = write_image(tmp_path / "cmyk.JPEG", solid(colour).convert("CMYK"))
    png = write_image(tmp_path / "png.JPEG", solid(colour), "PNG")
    level = solid(colour).convert("L").getpixel((0, 0))
    assert Image.open(cmyk).mode == "CMYK" and Image.open(png).format == "PNG"
    for path, expected in ((grey, (level,) * 3), (cmyk, colour), (png, colour)):
        image = decode_resized(path, 8)
        assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
        assert (image.float().mean((1, 2)) - torch.tensor(expected)).abs().max() <= 3, path.name


@pytest.mark.parametrize("size", [(300, 257), (257, 411), (256, 256)])
def test_centre_224_of_the_cache_is_torchvisions_evaluation(tmp_path, size):
    """torchvision scores its weights on Resize(256) + CenterCrop(224); the modern pipeline
    takes the centre 224 of the cached 256x256 centre: the same pixels, within 1 grey level."""
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (size[1] // 16 + 2, size[0] // 16 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(smooth).resize(size, Image.BICUBIC)
    path = write_image(tmp_path / "photo.png", image, "PNG")
    ours = decode_resized(path, 256)[:, 16:240, 16:240]
    theirs = v2.functional.pil_to_tensor(v2.CenterCrop(224)(v2.Resize(256)(image)))
    assert (ours.int() - theirs.int()).abs().max() <= 1


def test_the_subset_flags_keep_the_real_labels(tmp_path):
    write_imagenet(tmp_path, {"n01": 4, "n03": 8}, {"n01": 1}, "folders", mapping=["n01", "n02", "n03"])
    options = DataOptions(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), train_size=3)
    data = load_imagenet(options)
    assert data.num_classes == 3 and sorted(data.train.labels.tolist()) == [0, 2, 2]
    assert data.train.images.shape == (3, 3, 256, 256)


def test_download_is_refused_with_where_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"cannot be downloaded .*image-net\.org .*Kaggle"):
        load_imagenet(DataOptions(data_dir=str(tmp_path), download=True))


def test_an_image_listed_twice_with_its_class_is_labelled_once(tmp_path, caplog):
    write_imagenet(tmp_path, {"n01": 1, "n02": 1}, {"n01": 1, "n02": 1}, "kaggle")
    with open(tmp_path / "LOC_val_solution.csv", "a") as f:
        f.write("ILSVRC2012_val_00000002,n02 1 1 5 5\nILSVRC2012_val_00000099,n01 1 1 5 5\n")
    assert imagenet_lists(tmp_path).test_labels == [0, 1]
    assert (
        "LOC_val_solution.csv lists 1 images more than once, with the same class each time; each is labelled "
        "once" in caplog.text
    )


def test_one_class_without_a_mapping_is_refused(tmp_path):
    write_imagenet(tmp_path, {"n01": 2}, {"n01": 1})
    with pytest.raises(
        DataError, match=rf"^{tmp_path}/train has one class folder \(n01\); a classifier needs at least"
    ):
        imagenet_lists(tmp_path)
    write_imagenet(tmp_path, {}, {}, mapping=["n01", "n02"])  # the class index of ILSVRC-2012, all of it
    assert imagenet_lists(tmp_path).classes == ["class 01", "class 02"]
