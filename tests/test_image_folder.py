"""The ImageFolder reader: both layouts, the stratified split and subsets, the image modes and
EXIF orientation, the 32x32 size for -c, and its errors (through the command line: the
``IMAGE_FOLDER`` rows of bad_data.py, run by test_bad_data.py)."""

import logging
import os

import numpy as np
import pytest
import torch
from fakedata import class_colour, small_voc, solid, write_class_folders, write_image, write_imagenet
from PIL import Image

import main
from data import prepare
from data.core import DataError, DataOptions
from data.folders import image_folder_lists, stratified_split, stratified_subset
from data.imagenet import imagenet_lists
from data.images import decode_resized
from data.registry import load_dataset
from training.config import combination_problem, config_from_args, data_image_size

COUNTS = {"cat": 10, "dog": 20, "emu": 3}


@pytest.mark.parametrize("eval_folder", ["val", "valid", "test"])
def test_train_and_val_folders(tmp_path, eval_folder):
    write_class_folders(tmp_path / "train", {"b": 2, "a": 1}, ".png")
    write_class_folders(tmp_path / eval_folder, {"b": 1}, ".jpeg")
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".hidden").mkdir()
    lists = image_folder_lists(tmp_path, 0.5)
    assert lists.classes == ["a", "b"] and lists.test_source == f"{eval_folder}/"
    found = [(p.parent.name, p.name) for p in lists.train_paths]
    assert found == [("a", "a_0.png"), ("b", "b_0.png"), ("b", "b_1.png")]
    assert (lists.train_labels, lists.test_labels) == ([0, 1, 1], [1])


def test_a_val_fraction_beside_a_val_folder_is_said_to_be_unused(tmp_path, caplog):
    write_class_folders(tmp_path / "train", {"a": 2, "b": 1})
    write_class_folders(tmp_path / "val", {"a": 1})
    image_folder_lists(tmp_path, DataOptions.val_fraction)
    assert "--val-fraction" not in caplog.text
    lists = image_folder_lists(tmp_path, 0.3)
    assert len(lists.test_paths) == 1  # val/ is the evaluation split whatever the fraction
    assert f"--val-fraction 0.3 is unused: {tmp_path} has its own val/, which is the evaluation split" in caplog.text


def test_layout_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"holds no class folders; put each class's images in \S+/<class>/\.$"):
        image_folder_lists(tmp_path, 0.1)
    write_class_folders(tmp_path / "train", {"a": 1})
    with pytest.raises(DataError, match=r"has train/ but no val/, valid/ or test/; add one"):
        image_folder_lists(tmp_path, 0.1)
    write_class_folders(tmp_path / "val", {"z": 1})
    with pytest.raises(DataError, match=r"val has class folders that train/ lacks \(z\)"):
        image_folder_lists(tmp_path, 0.1)


def test_one_folder_is_split_deterministically_by_the_val_fraction(tmp_path):
    write_class_folders(tmp_path, COUNTS)
    lists = image_folder_lists(tmp_path, 0.2)
    assert lists == image_folder_lists(tmp_path, 0.2)
    assert np.bincount(lists.test_labels).tolist() == [2, 4, 1]  # round(0.2 n), at least one
    assert np.bincount(lists.train_labels).tolist() == [8, 16, 2]
    assert not set(lists.train_paths) & set(lists.test_paths)
    assert all(
        p.parent.name == lists.classes[label] for p, label in zip(lists.test_paths, lists.test_labels, strict=False)
    )
    assert np.bincount(image_folder_lists(tmp_path, 0.5).test_labels).tolist() == [5, 10, 2]


def test_the_split_of_a_class_does_not_depend_on_the_others():
    labels = [0] * 10 + [1] * 10
    _, val = stratified_split(labels, 0.3)
    _, val_alone = stratified_split(labels[:10], 0.3)
    assert val[:3].tolist() == val_alone.tolist() and len(val) == 6


def test_subsets_are_reproducible_stratified_and_nested():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    half = stratified_subset(labels, fraction=0.5)
    assert np.array_equal(half, stratified_subset(labels, fraction=0.5))
    assert np.bincount(np.asarray(labels)[half]).tolist() == [25, 15, 10]
    ten = stratified_subset(labels, size=10)
    assert np.bincount(np.asarray(labels)[ten]).tolist() == [5, 3, 2]
    assert set(ten) <= set(stratified_subset(labels, size=40)) and len(stratified_subset(labels, size=7)) == 7
    assert np.bincount(np.asarray(labels)[stratified_subset(labels, size=2)], minlength=3).min() == 1  # each class
    assert len(stratified_subset(labels, size=10**6)) == 100


def test_exif_rotation_is_applied(tmp_path):
    """Orientation 6: the stored image is shown turned 90 degrees clockwise, so its top-left
    quadrant is shown top-right."""
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:8, :8] = (255, 0, 0)
    path = write_image(tmp_path / "phone.jpg", Image.fromarray(pixels), orientation=6)
    image = decode_resized(path, 16)
    assert image[0, 3, 12] > 200 and image[0, 3, 3] < 50  # red top-right, not top-left
    assert image[0, 12, 3] < 50 and image[0, 12, 12] < 50


def test_palette_alpha_greyscale_cmyk_and_16_bit_become_rgb(tmp_path):
    red = solid((220, 20, 20))
    transparent = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    files = {
        "palette.png": (red.convert("P"), "PNG", (220, 20, 20)),
        "alpha.png": (transparent, "PNG", (255, 255, 255)),  # composed over white
        "grey.bmp": (red.convert("L"), "BMP", (red.convert("L").getpixel((0, 0)),) * 3),
        "cmyk.jpg": (red.convert("CMYK"), "JPEG", (220, 20, 20)),
        "deep.png": (Image.fromarray(np.full((8, 8), 257 * 100, np.uint16)), "PNG", (100, 100, 100)),
        "photo.webp": (red, "WEBP", (220, 20, 20)),
    }
    for name, (image, fmt, colour) in files.items():
        decoded = decode_resized(write_image(tmp_path / name, image, fmt), 8)
        assert decoded.shape == (3, 8, 8)
        assert (decoded.float().mean((1, 2)) - torch.tensor(colour)).abs().max() <= 4, name


def test_image_folder_loads_at_32_for_the_32x32_network(tmp_path):
    write_class_folders(tmp_path / "data", {"a": 4, "b": 4}, size=40)
    options = DataOptions(
        data_dir=str(tmp_path / "data"),
        cache_dir=str(tmp_path / "cache"),
        image_size=32,
        val_fraction=0.25,
        train_size=4,
    )
    data = load_dataset("ImageFolder", options)
    assert data.classes == ["a", "b"] and data.image_size == 32
    assert data.train.labels.tolist() == [0, 0, 1, 1] and data.test.labels.tolist() == [0, 1]
    expected = torch.tensor(class_colour(1), dtype=torch.float32)
    assert (data.train.images[-1].float().mean((1, 2)) - expected).abs().max() <= 3


def test_the_cache_beside_the_class_folders_is_not_a_class(tmp_path):
    write_class_folders(tmp_path, {"a": 2, "b": 2})
    options = DataOptions(data_dir=str(tmp_path), image_size=8, val_fraction=0.5)
    first = load_dataset("ImageFolder", options)
    assert (tmp_path / "alexnet_cache").is_dir()
    again = load_dataset("ImageFolder", options)
    assert again.classes == first.classes == ["a", "b"]
    assert torch.equal(again.train.images[:], first.train.images[:])


def test_images_in_subfolders_are_taken_and_counted(tmp_path, caplog):
    """As torchvision's ImageFolder: photos sorted into subfolders of their class stay in it,
    listed in the order of their path in the class folder; the count is logged."""
    caplog.set_level(logging.INFO)
    write_class_folders(tmp_path / "train", {"a": 1, "b": 1})
    write_class_folders(tmp_path / "train" / "a" / "2024", {"x": 2})
    write_class_folders(tmp_path / "train" / "a" / "2024" / "deeper", {"y": 1})
    write_class_folders(tmp_path / "val", {"a": 1, "b": 1})
    lists = image_folder_lists(tmp_path, 0.1)
    found = [str(p.relative_to(tmp_path / "train")) for p in lists.train_paths]
    assert found == ["a/2024/deeper/y/y_0.jpg", "a/2024/x/x_0.jpg", "a/2024/x/x_1.jpg", "a/a_0.jpg", "b/b_0.jpg"]
    assert lists.train_labels == [0, 0, 0, 0, 1]
    assert f"{tmp_path / 'train'}: took 3 images from subfolders of class folders" in caplog.text


def test_entries_that_are_not_regular_files_are_skipped_with_a_count(tmp_path, caplog):
    """A FIFO named like an image is never opened (it would block the first read), a broken link
    has nothing to read, and a link back up to the class folder is not followed round."""
    write_class_folders(tmp_path / "train", {"a": 2, "b": 2})
    write_class_folders(tmp_path / "val", {"a": 1, "b": 1})
    os.mkfifo(tmp_path / "train" / "a" / "fifo.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "train" / "b" / "broken.jpg")
    os.symlink("..", tmp_path / "train" / "b" / "up")
    lists = image_folder_lists(tmp_path, 0.1)
    assert [p.name for p in lists.train_paths] == ["a_0.jpg", "a_1.jpg", "b_0.jpg", "b_1.jpg"]
    train = tmp_path / "train"
    assert (
        f"{train}: skipped 2 entries that are not regular files (FIFOs, sockets, devices or broken links)"
        in caplog.text
    )
    assert f"{train}: skipped 1 links to folders already read or holding their class folder (a loop)" in caplog.text


def test_the_cache_is_left_out_by_its_identity_not_its_name(tmp_path):
    """In train/, a folder called alexnet_cache is a class like any other; beside the class
    folders of the single-folder layout, the default cache is left out, and --cache-dir may name
    it; any other --cache-dir among the class folders is refused."""
    write_class_folders(tmp_path / "split" / "train", {"a": 1, "alexnet_cache": 1})
    write_class_folders(tmp_path / "split" / "val", {"a": 1})
    assert image_folder_lists(tmp_path / "split", 0.1).classes == ["a", "alexnet_cache"]
    flat = tmp_path / "flat"
    write_class_folders(flat, {"a": 2, "b": 2})
    (flat / "alexnet_cache" / "train_256").mkdir(parents=True)
    assert image_folder_lists(flat, 0.5).classes == ["a", "b"]
    assert image_folder_lists(flat, 0.5, flat / "alexnet_cache").classes == ["a", "b"]
    with pytest.raises(DataError, match=rf"^--cache-dir {flat / 'mine'} is inside {flat}, whose subfolders are read"):
        image_folder_lists(flat, 0.5, flat / "mine")
    assert not (flat / "mine").exists()


def test_imagenet_refuses_a_cache_inside_train_or_val(tmp_path):
    write_imagenet(tmp_path, {"n01": 1, "n02": 1}, {"n01": 1}, "kaggle")
    with pytest.raises(DataError, match=rf"^--cache-dir {tmp_path}/train/c is inside {tmp_path}/train, whose sub"):
        imagenet_lists(tmp_path, tmp_path / "train" / "c")
    with pytest.raises(DataError, match=rf"^--cache-dir {tmp_path}/val is inside {tmp_path}/val, whose subfolders"):
        imagenet_lists(tmp_path, tmp_path / "val")
    assert len(imagenet_lists(tmp_path, tmp_path / "cache").classes) == 2


@pytest.mark.parametrize("dataset", ["ImageFolder", "ImageNet", "PascalVOC2012"])
def test_a_cache_dir_that_is_a_file_is_named_as_such(tmp_path, dataset):
    data = tmp_path / "data"
    if dataset == "ImageFolder":
        write_class_folders(data, {"a": 2, "b": 2})
    elif dataset == "ImageNet":
        write_imagenet(data, {"n01": 1, "n02": 1}, {"n01": 1})
    else:
        small_voc(data)
    (tmp_path / "afile").write_text("a file")
    options = DataOptions(data_dir=str(data), cache_dir=str(tmp_path / "afile" / "cache"))
    with pytest.raises(
        DataError, match=rf"^cannot create --cache-dir {tmp_path}/afile/cache \(Not a directory\); pass "
    ):
        load_dataset(dataset, options)
    options = DataOptions(data_dir=str(data), cache_dir=str(tmp_path / "afile"))
    with pytest.raises(DataError, match=rf"^--cache-dir {tmp_path}/afile is a file, not a folder; pass a folder for"):
        load_dataset(dataset, options)


def test_unreadable_files_are_named_together(tmp_path):
    write_class_folders(tmp_path / "data" / "train", {"a": 3, "b": 3})
    write_class_folders(tmp_path / "data" / "val", {"a": 1})
    good = (tmp_path / "data" / "train" / "a" / "a_0.jpg").read_bytes()
    (tmp_path / "data" / "train" / "b" / "b_1.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "data" / "train" / "a" / "a_2.jpg").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    options = DataOptions(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"2 of 6 images cannot be decoded: \S+/a/a_2\.jpg, \S+/b/b_1\.jpg \(the "):
        load_dataset("ImageFolder", options)


def phone_photo() -> Image.Image:
    """A smooth 4032 x 3024 picture, the size of a phone's 12-megapixel photo."""
    ramps = [Image.linear_gradient("L"), Image.linear_gradient("L").rotate(90), Image.radial_gradient("L")]
    return Image.merge("RGB", ramps).resize((4032, 3024), Image.BICUBIC)


def test_a_phone_photo_for_the_32x32_network_on_cuda_is_cached_as_the_cpu_resize(tmp_path):
    """4032 x 3024 to 32 pixels is a 94x downscale, which torchvision's antialiased resize on
    CUDA refused for lack of shared memory. The cache is built by Pillow on the CPU whatever the
    device: a -c run configured for CUDA (the CPU stand-in) stores every image as the JPEG of
    ``decode_resized``, byte for byte; a truncated copy of the photo is named in the one sentence
    about bad files."""
    from data.shards import decode_jpegs, encode_jpeg
    from hardware.capabilities import Capabilities

    data_dir = tmp_path / "data"
    write_class_folders(data_dir / "train", {"a": 2, "b": 2}, size=40)
    write_class_folders(data_dir / "val", {"a": 1, "b": 1}, size=40)
    phone = write_image(data_dir / "train" / "a" / "phone.jpg", phone_photo())
    cut = data_dir / "train" / "b" / "phone_cut.jpg"
    cut.write_bytes(phone.read_bytes()[: phone.stat().st_size // 3])
    args = main.get_args_parser().parse_args(
        ["-c", "-ds", "ImageFolder", "--data-dir", str(data_dir), "--cache-dir", str(tmp_path / "cache")]
    )
    config = config_from_args(args, Capabilities.stand_in())
    with pytest.raises(DataError, match=r"^\S+/b/phone_cut\.jpg cannot be decoded as an image \(.+\); replace it "):
        load_dataset("ImageFolder", config)
    cut.unlink()
    data = load_dataset("ImageFolder", config)
    paths = image_folder_lists(data_dir, config.val_fraction).train_paths
    assert paths[2] == phone and data.image_size == 32
    for path, cached in zip(paths, data.train.images[:], strict=True):
        jpeg = torch.frombuffer(bytearray(encode_jpeg(decode_resized(path, 32))), dtype=torch.uint8)
        assert torch.equal(cached, decode_jpegs([jpeg])[0]), path.name


def test_prepare_builds_both_splits_and_says_where(tmp_path, capsys):
    write_class_folders(tmp_path / "data", {"a": 3, "b": 3}, size=40)
    cache = tmp_path / "cache"
    assert (
        prepare.main(
            [
                "-ds",
                "ImageFolder",
                "--data-dir",
                str(tmp_path / "data"),
                "--cache-dir",
                str(cache),
                "-c",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    assert sorted(p.name for p in cache.iterdir()) == ["train_32", "val_32"]
    assert capsys.readouterr().out == (
        f"ImageFolder: 4 training and 2 evaluation images, 32x32, cached in {cache} ({size / 1e6:.1f} MB in all)\n"
    )


def combination(*flags):
    parser = main.get_args_parser()
    return combination_problem(parser, parser.parse_args(list(flags)))


def test_flag_combinations():
    assert combination("-c", "-ds", "ImageFolder") is None
    assert data_image_size(True) == 32 and data_image_size(False) == 256
    assert "cannot train on ImageNet's 256x256 images" in combination("-c", "-ds", "ImageNet")
    assert combination("-ds", "Shapes", "--val-fraction", "0.2") == "--val-fraction only applies to -ds ImageFolder"
    assert (
        combination("-ds", "Shapes", "--train-size", "5") == "--train-size only applies to -ds ImageNet or -ds "
        "ImageFolder"
    )
    assert combination("-ds", "ImageNet", "--train-fraction", "0.1") is None
