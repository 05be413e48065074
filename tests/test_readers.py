"""CIFAR and Pascal VOC readers: official layouts, exact contents, safe loading, the VOC cache."""

import logging
import os
import pickle
import re
import tarfile
import time
import urllib.error
import xml.dom.minidom
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import python2_pickle, tar_gz, voc_xml, write_cifar10, write_cifar100, write_voc
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from data.archives import is_writable_dir
from data.core import DataError, DataOptions
from data.images import decode_resized
from data.pickles import CifarUnpickler, safe_unpickle
from data.registry import load_dataset
from data.voc import VOC_CLASSES, VOC_MD5, VOC_URL, parse_voc_xml

# ---------------------------------------------------------------------------------------------
# CIFAR


def assert_cifar10_equal(data, written):
    assert torch.equal(data.train.images, torch.from_numpy(written["train_images"]))
    assert data.train.labels.tolist() == written["train_labels"]
    assert torch.equal(data.test.images, torch.from_numpy(written["test_images"]))
    assert data.test.labels.tolist() == written["test_labels"]
    assert data.classes[:3] == ["airplane", "automobile", "bird"] and data.num_classes == 10


@pytest.mark.parametrize("layout", ["seed", "official", "nested", "data-dir itself"])
def test_cifar10_layouts_read_back_exactly(tmp_path, layout):
    folder = {
        "seed": tmp_path / "cifar-10",
        "official": tmp_path / "cifar-10-batches-py",
        "nested": tmp_path / "cifar-10" / "cifar-10-batches-py",
        "data-dir itself": tmp_path,
    }[layout]
    written = write_cifar10(folder)
    assert_cifar10_equal(load_dataset("Cifar10", DataOptions(data_dir=tmp_path)), written)


def test_cifar_pixels_are_in_chw_row_order(tmp_path):
    """The 3072 bytes of a row are 1024 red, 1024 green, 1024 blue, each row-major."""
    written = write_cifar10(tmp_path / "cifar-10", per_batch=1, n_test=1)
    data = load_dataset("Cifar10", DataOptions(data_dir=tmp_path))
    row = written["train_images"][0].reshape(3072)
    assert data.train.images[0, 1, 2, 5].item() == row[1024 + 2 * 32 + 5]


def test_cifar10_archive_is_extracted_once_next_to_it(tmp_path):
    source = tmp_path / "build" / "cifar-10-batches-py"
    written = write_cifar10(source)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    tar_gz(source, data_dir / "cifar-10-python.tar.gz")
    assert_cifar10_equal(load_dataset("Cifar10", DataOptions(data_dir=data_dir)), written)
    extracted = data_dir / "cifar-10-batches-py" / "data_batch_1"
    assert extracted.is_file()
    stamp = extracted.stat().st_mtime_ns
    time.sleep(0.01)
    assert_cifar10_equal(load_dataset("Cifar10", DataOptions(data_dir=data_dir)), written)
    assert extracted.stat().st_mtime_ns == stamp  # not extracted again


def test_damaged_archive_is_a_clear_error(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz is damaged .*; download it again\."):
        load_dataset("Cifar10", DataOptions(data_dir=tmp_path))


def test_cifar100_fine_and_coarse_labels(tmp_path):
    written = write_cifar100(tmp_path / "cifar-100-python")
    fine = load_dataset("Cifar100", DataOptions(data_dir=tmp_path))
    images, fine_labels, coarse_labels = written["train"]
    assert torch.equal(fine.train.images, torch.from_numpy(images))
    assert fine.train.labels.tolist() == fine_labels
    assert fine.test.labels.tolist() == written["test"][1]
    assert fine.num_classes == 100 and fine.classes[7] == "fine7"
    coarse = load_dataset("Cifar100", DataOptions(data_dir=tmp_path, coarse_labels=True))
    assert coarse.train.labels.tolist() == coarse_labels
    assert coarse.num_classes == 20 and coarse.classes[3] == "coarse3"


def test_shared_cifar100_sample(shared_data):
    """The real (partial) CIFAR-100 files: counts as found, contents as a plain unpickler sees them."""
    data = load_dataset("Cifar100", DataOptions(data_dir=shared_data))
    folder = shared_data / "cifar-100-python"
    for split, name in ((data.train, "train"), (data.test, "test")):
        with open(folder / name, "rb") as f:
            reference = pickle.load(f, encoding="bytes")  # trusted here: the test's own reference
        assert len(split) == len(reference[b"fine_labels"])
        assert torch.equal(split.images, torch.from_numpy(reference[b"data"]).view(-1, 3, 32, 32))
        assert split.labels.tolist() == reference[b"fine_labels"]
    assert (len(data.train), len(data.test)) == (486, 916)
    assert len(data.classes) == 100 and data.classes[:3] == ["apple", "aquarium_fish", "baby"]
    assert len(set(data.train.labels.tolist())) == 99 and len(set(data.test.labels.tolist())) == 100


class Exploit:
    """Unpickling this calls os.system (the classic pickle attack)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10"
    write_cifar10(folder)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Exploit(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2 asks to call posix.system, which no CIFAR file does"):
        load_dataset("Cifar10", DataOptions(data_dir=tmp_path))
    assert not marker.exists()
    # The same file through a plain unpickler would have run the command: the test is real.
    pickle.loads((folder / "data_batch_2").read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], r"is truncated or not a CIFAR pickle"),
        (lambda b: b"", r"is truncated or not a CIFAR pickle"),
        (lambda b: b"hello, I am a text file\n", r"is truncated or not a CIFAR pickle"),
        (lambda b: python2_pickle({b"pixels": np.zeros((1, 3072), np.uint8)}), r"is not a CIFAR batch file"),
        (lambda b: python2_pickle([1, 2, 3]), r"is not a CIFAR batch file"),
        (
            lambda b: python2_pickle({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}),
            r"b'data' must be a uint8 N x 3072 array, found \(2, 1024\)",
        ),
        (
            lambda b: python2_pickle({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}),
            r"b'data' must be a uint8 N x 3072 array",
        ),
        (
            lambda b: python2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
            r"must hold one whole-number label per image",
        ),
        (
            lambda b: python2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}),
            r"labels must be 0..9, found 0..12",
        ),
        (
            lambda b: python2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 3]}),
            r"labels must be 0..9, found -1..3",
        ),
    ],
)
def test_damaged_cifar_batches_are_clear_errors(tmp_path, damage, message):
    folder = tmp_path / "cifar-10"
    write_cifar10(folder)
    path = folder / "data_batch_3"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message) as error:
        load_dataset("Cifar10", DataOptions(data_dir=tmp_path))
    assert "data_batch_3" in str(error.value)


def test_missing_batch_and_meta_files_are_named(tmp_path):
    folder = tmp_path / "cifar-10"
    write_cifar10(folder)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"data_batch_4 is missing; copy the complete cifar-10 folder"):
        load_dataset("Cifar10", DataOptions(data_dir=tmp_path))
    (folder / "batches.meta").unlink()
    with pytest.raises(DataError, match=r"batches.meta is missing"):
        load_dataset("Cifar10", DataOptions(data_dir=tmp_path))


def test_missing_or_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist; create it and put CIFAR-10"):
        load_dataset("Cifar10", DataOptions(data_dir=tmp_path / "nowhere"))
    with pytest.raises(
        DataError,
        match=r"found no CIFAR-100 in .*: put the official python version there as "
        r"cifar-100/, cifar-100-python/ or cifar-100-python.tar.gz, or pass --download",
    ):
        load_dataset("Cifar100", DataOptions(data_dir=tmp_path))


def test_download_failure_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(url, root, filename=None, md5=None, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(
        DataError,
        match=r"could not download CIFAR-10 from https://www.cs.toronto.edu/~kriz/"
        r"cifar-10-python.tar.gz \(.*no route to host.*\); download it by hand and put it in",
    ):
        load_dataset("Cifar10", DataOptions(data_dir=tmp_path / "new", download=True))


def test_download_uses_torchvisions_checksummed_downloader_then_our_extraction(tmp_path, monkeypatch, caplog):
    """The archive is fetched by torchvision (checksum) and unpacked by ``extract_archive``, so a
    download obeys the same rule as an archive the user put there: only the data set's folder."""
    import torchvision.datasets.utils as tv_utils

    source = tmp_path / "build" / "cifar-10-batches-py"
    write_cifar10(source)
    (tmp_path / "build" / "checkpoints").mkdir()
    (tmp_path / "build" / "checkpoints" / "x.pt").write_text("from the archive")
    calls = []

    def fake(url, root, filename=None, md5=None, **kwargs):
        calls.append((url, filename, md5))
        with tarfile.open(Path(root) / filename, "w:gz") as tar:
            tar.add(source, arcname="cifar-10-batches-py")
            tar.add(tmp_path / "build" / "checkpoints", arcname="checkpoints")

    monkeypatch.setattr(tv_utils, "download_url", fake)
    data = load_dataset("Cifar10", DataOptions(data_dir=tmp_path / "new", download=True))
    assert calls == [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
        )
    ]
    assert len(data.train) == 15
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert "left out 2 entries outside cifar-10-batches-py/" in caplog.text  # checkpoints/ and x.pt
    load_dataset("Cifar10", DataOptions(data_dir=tmp_path / "new", download=True))
    assert len(calls) == 1  # already there: no second download


def test_voc_download_goes_through_the_same_extraction(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    build = tmp_path / "build"
    make_voc(build, "devkit")
    (build / "stray.txt").write_text("beside the devkit")

    def fake(url, root, filename=None, md5=None, **kwargs):
        assert (url, md5) == (VOC_URL, VOC_MD5)
        with tarfile.open(Path(root) / filename, "w") as tar:  # the VOC archive is a plain .tar
            tar.add(build / "VOCdevkit", arcname="VOCdevkit")
            tar.add(build / "stray.txt", arcname="stray.txt")

    monkeypatch.setattr(tv_utils, "download_url", fake)
    data_dir = tmp_path / "data"
    data = load_dataset("PascalVOC2012", DataOptions(data_dir=data_dir, download=True, cache_dir=tmp_path / "cache"))
    assert (len(data.train), len(data.test)) == (3, 2)
    assert (data_dir / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2008_000001.jpg").is_file()
    assert not (data_dir / "stray.txt").exists()


# ---------------------------------------------------------------------------------------------
# Pascal VOC 2012


def labels_by_hand(xml_path: Path) -> list[int]:
    """The label vector worked out with a different parser: 1 / -1 / 0 (difficult only)."""
    doc = xml.dom.minidom.parse(str(xml_path))
    present, difficult = set(), set()
    for obj in doc.getElementsByTagName("object"):
        name = next(c for c in obj.childNodes if c.nodeName == "name").firstChild.data.strip()
        flag = obj.getElementsByTagName("difficult")
        (difficult if flag and flag[0].firstChild.data.strip() == "1" else present).add(name)
    return [1 if c in present else 0 if c in difficult else -1 for c in VOC_CLASSES]


def test_voc_class_order_is_the_official_one():
    assert VOC_CLASSES == [
        "aeroplane",
        "bicycle",
        "bird",
        "boat",
        "bottle",
        "bus",
        "car",
        "cat",
        "chair",
        "cow",
        "diningtable",
        "dog",
        "horse",
        "motorbike",
        "person",
        "pottedplant",
        "sheep",
        "sofa",
        "train",
        "tvmonitor",
    ]


def test_shared_voc2012_sample_labels(shared_data, tmp_path, caplog):
    data = load_dataset("PascalVOC2012", DataOptions(data_dir=shared_data, cache_dir=tmp_path))
    folder = shared_data / "VOCdevkit" / "VOC2012"
    ids = (folder / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    assert data.multilabel and data.classes == VOC_CLASSES
    assert data.train.labels.dtype == torch.int8 and data.train.labels.shape == (len(ids), 20)
    for row, image_id in zip(data.train.labels.tolist(), ids, strict=False):
        assert row == labels_by_hand(folder / "Annotations" / f"{image_id}.xml"), image_id
    # 2007_000032 holds aeroplanes and people, nothing else.
    first = dict(zip(VOC_CLASSES, data.train.labels[ids.index("2007_000032")].tolist(), strict=False))
    assert {c for c, v in first.items() if v == 1} == {"aeroplane", "person"}
    assert "training on trainval.txt, evaluating on test.txt" in caplog.text
    assert data.train.images.shape == (len(ids), 3, 256, 256)


def test_shared_voc2007_difficult_objects(shared_data):
    """000005 has both difficult and non-difficult chairs: chair counts as present."""
    labels = dict(
        zip(VOC_CLASSES, parse_voc_xml(shared_data / "VOCdevkit/VOC2007/Annotations/000005.xml").tolist(), strict=False)
    )
    assert labels["chair"] == 1
    assert labels == dict(
        zip(VOC_CLASSES, labels_by_hand(shared_data / "VOCdevkit/VOC2007/Annotations/000005.xml"), strict=False)
    )


def make_voc(tmp_path: Path, layout: str = "seed") -> Path:
    folder = {
        "seed": tmp_path / "PascalVOC2012",
        "devkit": tmp_path / "VOCdevkit" / "VOC2012",
        "seed devkit": tmp_path / "PascalVOC2012" / "VOCdevkit" / "VOC2012",
    }[layout]
    annotations = {
        "2008_000001": [("dog", False), ("person", False), ("person", True)],
        "2008_000002": [("cat", True)],  # difficult only: ignored
        "2008_000003": [("bus", False), ("car", True), ("car", False)],
        "2008_000004": [("tvmonitor", False), ("sofa", True), ("sofa", True)],
        "2008_000005": [("bird", False)],
    }
    lists = {"train": ["2008_000001", "2008_000002", "2008_000003"], "val": ["2008_000004", "2008_000005"]}
    return write_voc(folder, annotations, lists)


@pytest.mark.parametrize("layout", ["seed", "devkit", "seed devkit"])
def test_voc_layouts_and_multilabel_targets(tmp_path, layout):
    make_voc(tmp_path, layout)
    data = load_dataset("PascalVOC2012", DataOptions(data_dir=tmp_path, cache_dir=tmp_path / "cache"))
    assert (len(data.train), len(data.test)) == (3, 2)  # train.txt / val.txt
    rows = [dict(zip(VOC_CLASSES, r, strict=False)) for r in data.train.labels.tolist() + data.test.labels.tolist()]
    assert {c for c, v in rows[0].items() if v == 1} == {"dog", "person"}
    assert rows[1]["cat"] == 0 and sum(v == 1 for v in rows[1].values()) == 0
    assert rows[2]["car"] == 1 and rows[2]["bus"] == 1
    assert rows[3]["sofa"] == 0 and rows[3]["tvmonitor"] == 1
    assert sum(v == -1 for v in rows[4].values()) == 19


def test_voc_cache_holds_the_resized_centre_crop(tmp_path):
    folder = make_voc(tmp_path)
    data = load_dataset("PascalVOC2012", DataOptions(data_dir=tmp_path, cache_dir=tmp_path / "cache"))
    for i, image_id in enumerate(["2008_000001", "2008_000002"]):  # 500x375 and 333x500
        image = Image.open(folder / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
        expected = TF.pil_to_tensor(TF.center_crop(TF.resize(image, [256]), [256, 256]))
        # The cache holds quality-95 4:4:4 JPEGs of the resize (data.shards): lossy, so within 2
        # grey levels on average; the resize itself is within 1 of resize-then-crop (below).
        diff = (data.train.images[i].int() - expected.int()).abs()
        assert diff.float().mean() <= 2


def test_voc_cache_is_built_once_and_rebuilt_when_an_image_changes(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    folder = make_voc(tmp_path)
    options = DataOptions(data_dir=tmp_path, cache_dir=tmp_path / "cache")
    load_dataset("PascalVOC2012", options)
    cache = tmp_path / "cache" / "train_256" / "00000.shard"
    stamp = cache.stat().st_mtime_ns
    caplog.clear()
    load_dataset("PascalVOC2012", options)
    assert cache.stat().st_mtime_ns == stamp and "building" not in caplog.text
    assert "Pascal VOC 2012 from" in caplog.text  # INFO lines are captured: the check above is real

    jpeg = folder / "JPEGImages" / "2008_000002.jpg"
    Image.new("RGB", (300, 300), (255, 0, 0)).save(jpeg)
    data = load_dataset("PascalVOC2012", options)
    assert "rebuilding" in caplog.text
    assert data.train.images[1, 0].float().mean() > 250 and data.train.images[1, 2].float().mean() < 5


def test_shared_voc_images_are_within_one_grey_level_of_resize_then_crop(shared_data):
    """The real photos through ``decode_resized`` (only the centre box resampled) against the
    whole-image resize then centre crop the cache held before (torchvision's own functions)."""
    paths = sorted((shared_data / "VOCdevkit").glob("*/JPEGImages/*.jpg"))
    assert len(paths) == 8
    for path in paths:
        image = Image.open(path).convert("RGB")
        expected = TF.pil_to_tensor(TF.center_crop(TF.resize(image, [256]), [256, 256]))
        diff = (decode_resized(path, 256).int() - expected.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.005, path.name


def test_voc_cache_defaults_to_a_folder_inside_the_data(tmp_path):
    folder = make_voc(tmp_path)
    load_dataset("PascalVOC2012", DataOptions(data_dir=tmp_path))
    assert (folder / "alexnet_cache" / "train_256" / "00000.shard").is_file()


def test_read_only_voc_folder_caches_in_the_user_cache(tmp_path, monkeypatch):
    folder = make_voc(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real = is_writable_dir
    monkeypatch.setattr("data.voc.is_writable_dir", lambda p: False if folder in p.parents or p == folder else real(p))
    load_dataset("PascalVOC2012", DataOptions(data_dir=tmp_path))
    assert len(list((tmp_path / "xdg" / "alexnet").glob("voc2012-*/train_256/00000.shard"))) == 1
    assert not (folder / "alexnet_cache").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda f: (f / "JPEGImages" / "2008_000003.jpg").unlink(),
            (
                r"ImageSets/Main/train.txt names 2008_000003, but .*JPEGImages/2008_000003.jpg does not exist; "
                r"restore it or remove the line\."
            ),
        ),
        (
            lambda f: (f / "Annotations" / "2008_000004.xml").unlink(),
            r"val.txt names 2008_000004, but .*Annotations/2008_000004.xml does not exist",
        ),
        (
            lambda f: (f / "JPEGImages" / "2008_000001.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated"),
            r"JPEGImages/2008_000001.jpg cannot be decoded as an image \(.*\); replace it with a good copy",
        ),
        (
            lambda f: (f / "Annotations" / "2008_000002.xml").write_text("<annotation><object><name>cat</name>"),
            r"Annotations/2008_000002.xml is not well-formed XML \(.*\); restore it from the VOC release\.",
        ),
        (
            lambda f: (f / "Annotations" / "2008_000005.xml").write_text(voc_xml("x.jpg", 5, 5, [("unicorn", False)])),
            r"Annotations/2008_000005.xml names an unknown class 'unicorn' \(VOC has aeroplane, bicycle",
        ),
        (lambda f: (f / "ImageSets" / "Main" / "val.txt").write_text("\n"), r"image list .*val.txt is empty"),
        (
            lambda f: [(f / "ImageSets" / "Main" / n).unlink() for n in ("train.txt", "val.txt")],
            r"ImageSets/Main has neither train.txt \+ val.txt nor trainval.txt \+ test.txt",
        ),
    ],
)
def test_damaged_voc_is_a_clear_error(tmp_path, damage, message):
    damage(make_voc(tmp_path))
    with pytest.raises(DataError, match=message):
        load_dataset("PascalVOC2012", DataOptions(data_dir=tmp_path, cache_dir=tmp_path / "cache"))


def test_xml_with_entities_is_refused_before_parsing(tmp_path):
    bomb = (
        '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
        + "".join(f'<!ENTITY lol{i + 1} "{"&lol" + str(i) + ";" * 1}{("&lol" + str(i) + ";") * 9}">' for i in range(9))
        + "]>\n<annotation><object><name>&lol9;</name></object></annotation>"
    ).replace("&lol0;", "&lol;")
    path = tmp_path / "bomb.xml"
    path.write_text(bomb)
    with pytest.raises(DataError, match=r"bomb.xml declares a DOCTYPE or entities, which VOC annotations never do"):
        parse_voc_xml(path)
    external = tmp_path / "external.xml"
    external.write_text('<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation>&x;</annotation>')
    with pytest.raises(DataError, match=r"declares a DOCTYPE"):
        parse_voc_xml(external)


def test_no_voc_in_the_data_folder(tmp_path):
    with pytest.raises(
        DataError,
        match=r"found no Pascal VOC 2012 in .*: put the VOCdevkit/VOC2012 folder there "
        r"as PascalVOC2012/ \(or VOCdevkit/\)",
    ):
        load_dataset("PascalVOC2012", DataOptions(data_dir=tmp_path))


def test_voc_xml_name_of_owner_or_part_is_not_a_class(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(voc_xml("a.jpg", 10, 10, [("person", False)]))
    assert re.search(r"<name>Some Owner</name>", path.read_text()) and "<name>head</name>" in path.read_text()
    labels = parse_voc_xml(path)
    assert labels.tolist() == [1 if c == "person" else -1 for c in VOC_CLASSES]


def test_unpickler_allows_only_the_official_globals():
    assert set(CifarUnpickler.ALLOWED) == {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }


def test_safe_unpickle_reads_python3_protocol2_files_too(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"name": b"x"}, protocol=2))
    obj = safe_unpickle(path)
    assert obj[b"name"] == b"x" and obj[b"data"].tolist() == [[0, 1, 2], [3, 4, 5]]
