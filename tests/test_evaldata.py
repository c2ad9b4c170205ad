"""Loaders on small files written here in the published formats."""
import os

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import functional as TF

from ice_prune import data


def normalized(a):
    return TF.normalize(TF.to_tensor(a), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def write_gtsegs(path, images, masks):
    """MATLAB v7.3 layout of gtsegs_ijcv.mat: /value/img [N,1] refs to [3,W,H] uint8; /value/gt [N,1]
    refs to a 1x1 cell (a ref array) whose ref points at the [W,H] mask (column-major, transposed)."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        img_refs = f.create_dataset("value/img", (len(images), 1), dtype=h5py.ref_dtype)
        gt_refs = f.create_dataset("value/gt", (len(images), 1), dtype=h5py.ref_dtype)
        for i, (img, mask) in enumerate(zip(images, masks)):
            img_refs[i, 0] = refs.create_dataset(f"img{i}", data=img.transpose(2, 1, 0)).ref
            m = refs.create_dataset(f"mask{i}", data=mask.T)
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = m.ref
            gt_refs[i, 0] = cell.ref


def test_imagenet_segmentation_mat(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)]
    masks = [np.zeros((8, 8), np.uint8), np.zeros((6, 10), np.uint8)]
    masks[0][1:3, 2:7] = 1               # not symmetric: a transposition error shows
    masks[1][:, :5] = 1
    path = str(tmp_path / "gtsegs_ijcv.mat")
    write_gtsegs(path, imgs, masks)
    ds = data.ImageNetSegmentation(path, image_size=8)
    assert len(ds) == 2
    image, mask = ds[0]
    torch.testing.assert_close(image, normalized(imgs[0]))
    assert torch.equal(mask, torch.from_numpy(masks[0]).long())
    image, mask = ds[1]                  # 6x10 resized to 8x8; left half stays foreground
    assert image.shape == (3, 8, 8) and mask.shape == (8, 8)
    assert mask[:, :4].all() and not mask[:, 4:].any()


def test_imagenet_segmentation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gtsegs_ijcv.mat"):
        data.ImageNetSegmentation(str(tmp_path / "missing.mat"))
    with h5py.File(tmp_path / "other.mat", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ValueError, match="/value/img"):
        data.ImageNetSegmentation(str(tmp_path / "other.mat"))


VOC_XML = """<annotation><folder>VOC2012</folder><filename>{name}.jpg</filename>
<size><width>16</width><height>8</height><depth>3</depth></size>
<object><name>dog</name><truncated>0</truncated><difficult>0</difficult>
<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>8</xmax><ymax>4</ymax></bndbox></object>
<object><name>cat</name><truncated>1</truncated><difficult>0</difficult>
<bndbox><xmin>9</xmin><ymin>3</ymin><xmax>16</xmax><ymax>8</ymax></bndbox></object>
</annotation>"""


def write_voc(root, year="2012"):
    base = os.path.join(root, "VOCdevkit", f"VOC{year}")
    for d in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation", "ImageSets/Main"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    label = np.zeros((8, 16), np.uint8)
    label[:4, :8] = 12
    label[4:, 8:] = 8
    label[4, :] = 255
    palette = Image.new("P", (16, 8))
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    lab = Image.fromarray(label, mode="P")
    lab.putpalette(palette.getpalette())
    lab.save(os.path.join(base, "SegmentationClass", "2008_000001.png"))
    Image.fromarray(np.full((8, 16, 3), 128, np.uint8)).save(os.path.join(base, "JPEGImages", "2008_000001.jpg"))
    with open(os.path.join(base, "Annotations", "2008_000001.xml"), "w") as f:
        f.write(VOC_XML.format(name="2008_000001"))
    for split in ("Segmentation/val.txt", "Main/trainval.txt"):
        with open(os.path.join(base, "ImageSets", split), "w") as f:
            f.write("2008_000001\n")
    return label


def test_voc_segmentation(tmp_path):
    label = write_voc(str(tmp_path))
    ds = data.VOCSegmentationEval(str(tmp_path), image_size=16)
    image, target = ds[0]
    assert image.shape == (3, 16, 16)
    # 16x8 -> 16x16, nearest: every row doubled; palette indices kept (not colours)
    assert torch.equal(target, torch.from_numpy(np.repeat(label, 2, axis=0)).long())


def test_voc_detection_boxes(tmp_path):
    write_voc(str(tmp_path))
    ds = data.VOCDetectionEval(str(tmp_path), year="2012", image_size=16)
    image, boxes = ds[0]
    # LOST: xmin - 1, ymin - 1; then the 16x8 image becomes 16x16, y doubled
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0, 8, 8], [8, 4, 16, 16]]))
    hard = data.VOCDetectionEval(str(tmp_path), year="2012", image_size=16, remove_hards=True)
    assert hard[0][1].shape == (1, 4)     # the truncated cat is dropped


def test_cub(tmp_path):
    root = tmp_path / "CUB_200_2011"
    os.makedirs(root / "images" / "001.Albatross")
    os.makedirs(root / "images" / "002.Auklet")
    files = {"images.txt": "1 001.Albatross/a.jpg\n2 002.Auklet/b.jpg\n3 002.Auklet/c.jpg\n",
             "image_class_labels.txt": "1 1\n2 2\n3 2\n",
             "train_test_split.txt": "1 1\n2 0\n3 0\n",
             "bounding_boxes.txt": "1 0.0 0.0 4.0 4.0\n2 2.0 1.0 6.0 3.0\n3 1.0 1.0 1.0 1.0\n"}
    for name, text in files.items():
        (root / name).write_text(text)
    for rel, size in (("001.Albatross/a.jpg", (8, 8)), ("002.Auklet/b.jpg", (10, 5)),
                      ("002.Auklet/c.jpg", (8, 8))):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(root / "images" / rel)
    test = data.CUB200(str(root), split="test", image_size=20)
    assert len(test) == 2 and len(data.CUB200(str(root), split="train")) == 1
    image, label, box = test[0]
    assert image.shape == (3, 20, 20) and label == 1
    # x 2..8 of a 10-wide image, y 1..4 of a 5-high one, scaled to 20x20
    torch.testing.assert_close(box, torch.tensor([4.0, 4.0, 16.0, 16.0]))
    with pytest.raises(FileNotFoundError, match="CUB_200_2011"):
        data.CUB200(str(tmp_path))
