"""Annotation files (labelme, COCO, Label Studio) rasterised by hand-worked rules; the one mask rule by value.

Every expected mask below is worked out by hand in a comment: the rule is "pixel (column x, row y) is defect
when the point (x, y) is inside or on the polygon / rectangle, or within the circle's radius".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adps.data.annotations import AnnotationError, rasterise, read_annotation_file
from adps.data.images import decode_image, mask_defect

# A rectangle polygon with corners (2, 1) and (5, 3) on an 8 x 6 image: columns 2..5 (4) x rows 1..3 (3) = 12 pixels.
RECTANGLE_12 = np.zeros((6, 8), bool)
RECTANGLE_12[1:4, 2:6] = True


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def labelme(path: Path, shapes: list[dict], width: int = 8, height: int = 6, image: str = "part.png") -> Path:
    doc = {"version": "5.2.1", "shapes": shapes, "imagePath": image, "imageWidth": width, "imageHeight": height}
    return write_json(path, doc)


def shape(kind: str, points: list[list[float]]) -> dict:
    return {"label": "pitting", "points": points, "shape_type": kind, "group_id": None, "flags": {}}


def only(path: Path):
    [entry] = read_annotation_file(path)
    return entry


def test_labelme_polygon_rectangle_and_circle_fill_the_pixels_worked_out_by_hand(tmp_path):
    rectangle = only(labelme(tmp_path / "a.json", [shape("polygon", [[2, 1], [5, 1], [5, 3], [2, 3]])]))
    assert rectangle.names == ("part.png",) and rectangle.stated_size == (8, 6)
    assert (rasterise(rectangle, (8, 6)) == RECTANGLE_12).all()
    # Triangle (1,1) (6,1) (1,4): the hypotenuse is x = 6 - 5/3 (y - 1). Row 1: x 1..6 (6); row 2: x <= 4.33,
    # 1..4 (4); row 3: x <= 2.67, 1..2 (2); row 4: the vertex, x = 1 (1). 6 + 4 + 2 + 1 = 13.
    triangle = only(labelme(tmp_path / "t.json", [shape("polygon", [[1, 1], [6, 1], [1, 4]])]))
    mask = rasterise(triangle, (8, 6))
    assert mask.sum() == 13 and mask[1, 1:7].all() and mask[2, 1:5].all() and mask[3, 1:3].all() and mask[4, 1]
    # labelme's rectangle: its two corners, any order: the same 12 pixels.
    box = only(labelme(tmp_path / "r.json", [shape("rectangle", [[5, 3], [2, 1]])]))
    assert (rasterise(box, (8, 6)) == RECTANGLE_12).all()
    # Circle centre (4, 4) through (4, 6): radius 2; lattice points with dx^2 + dy^2 <= 4: the centre (1), the
    # four at distance 1, the four diagonals (1 + 1 = 2) and the four at distance 2: 13.
    circle = only(labelme(tmp_path / "c.json", [shape("circle", [[4, 4], [4, 6]])], width=9, height=9))
    mask = rasterise(circle, (9, 9))
    assert mask.sum() == 13 and mask[4, 2:7].all() and mask[2:7, 4].all() and not mask[3, 2]


def test_labelme_shapes_without_area_and_a_wrong_size_are_refused_by_name(tmp_path):
    path = labelme(tmp_path / "x.json", [shape("polygon", [[2, 1], [5, 1], [5, 3]]), shape("line", [[0, 0], [5, 5]])])
    with pytest.raises(AnnotationError, match=r"labelme shapes\[1\] \(line\): shape type 'line' is not read"):
        read_annotation_file(path)
    wrong = only(labelme(tmp_path / "w.json", [shape("rectangle", [[2, 1], [5, 3]])], width=9))
    with pytest.raises(AnnotationError, match="states the image is 9 x 6 px, the image is 8 x 6 px"):
        rasterise(wrong, (8, 6))
    windows = only(labelme(tmp_path / "win.json", [], image="..\\images\\part 7.jpg"))
    assert windows.names == ("part 7.jpg",) and windows.stem == "win" and not windows.regions


def coco(path: Path, annotations: list[dict], width: int = 8, height: int = 6) -> Path:
    images = [{"id": 1, "file_name": "imgs/part.png", "width": width, "height": height}]
    return write_json(path, {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "d"}]})


# Column-major runs on 8 x 6 (48 pixels, index = x * 6 + y): 8 background (x = 0 and x = 1, y 0..1), 3 defect
# (x = 1, y 2..4), 3 background (x = 1, y 5; x = 2, y 0..1), 3 defect (x = 2, y 2..4), 31 background: 48 in all.
RUNS = [8, 3, 3, 3, 31]
RUN_MASK = np.zeros((6, 8), bool)
RUN_MASK[2:5, 1:3] = True  # 6 pixels
# The same runs compressed as COCO does: one 5-bit group per character (+ 48), 0x20 = more follows; from the
# fourth run on, the difference to the run two before. 8 -> "8"; 3 -> "3"; 3 -> "3"; 3 - 3 = 0 -> "0";
# 31 - 3 = 28 = 0b11100: low group 28 has its sign bit 0x10 set, so one more group follows:
# 28 | 0x20 = 60 -> chr(108) "l", then 0 -> "0".
RUNS_STRING = "8330l0"


@pytest.mark.parametrize(
    ("segmentation", "expected"),
    [
        ([[2, 1, 5, 1, 5, 3, 2, 3]], RECTANGLE_12),
        ({"size": [6, 8], "counts": RUNS}, RUN_MASK),
        ({"size": [6, 8], "counts": RUNS_STRING}, RUN_MASK),
    ],
    ids=["polygon", "uncompressed-rle", "compressed-rle"],
)
def test_coco_polygons_and_both_rle_forms(tmp_path, segmentation, expected):
    entry = only(coco(tmp_path / "coco.json", [{"id": 7, "image_id": 1, "segmentation": segmentation, "iscrowd": 0}]))
    assert entry.names == ("part.png",) and entry.stated_size == (8, 6)
    assert (rasterise(entry, (8, 6)) == expected).all()


def test_coco_entries_that_cannot_be_drawn_name_the_annotation(tmp_path):
    box_only = coco(tmp_path / "b.json", [{"id": 3, "image_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 0}])
    with pytest.raises(AnnotationError, match=r"COCO annotations\[id=3\]: no segmentation"):
        read_annotation_file(box_only)
    short = only(coco(tmp_path / "s.json", [{"id": 4, "image_id": 1, "segmentation": {"size": [6, 8], "counts": [8]}}]))
    with pytest.raises(AnnotationError, match=r"annotations\[id=4\]: RLE counts add up to 8 pixels, the image has 48"):
        rasterise(short, (8, 6))
    orphan = coco(tmp_path / "o.json", [{"id": 5, "image_id": 9, "segmentation": [[0, 0, 1, 0, 1, 1]]}])
    with pytest.raises(AnnotationError, match="image_id 9, which images does not list"):
        read_annotation_file(orphan)


def bits_to_bytes(bits: str) -> list[int]:
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


# Label Studio brush RLE of an 8 x 6 image whose pixels (x 2..3, y 1) are painted: the RGBA layer, row by row,
# is 192 values: pixels 0..9 (40 values) 0, pixels 10..11 (8 values) 255, pixels 12..47 (144 values) 0.
BRUSH_BITS = (
    "00000000000000000000000011000000"  # 32 bits: 192 values
    "00111"  # 5 bits: word size - 1 = 7 (8-bit words)
    "0010"
    "0011"
    "0111"
    "1111"  # four run-length sizes - 1: 3, 4, 8 and 16 bits
    "1"
    "10"
    "00100111"
    "00000000"  # repeat, size #2 (8 bits): 39 + 1 = 40 times the word 0
    "1"
    "00"
    "111"
    "11111111"  # repeat, size #0 (3 bits): 7 + 1 = 8 times the word 255
    "1"
    "10"
    "10001111"
    "00000000"  # repeat, size #2: 143 + 1 = 144 times 0
)


def label_studio(path: Path, results: list[dict], image: str = "/data/upload/3/1a2b3c4d-part.png") -> Path:
    task = {"id": 12, "data": {"image": image}, "annotations": [{"id": 1, "result": results, "was_cancelled": False}]}
    return write_json(path, [task])


def ls_result(kind: str, value: dict, width: int, height: int) -> dict:
    return {"type": kind, "value": value, "original_width": width, "original_height": height, "from_name": "tag"}


def test_label_studio_brush_rle_and_polygon_in_percent(tmp_path):
    brush = ls_result("brushlabels", {"format": "rle", "rle": bits_to_bytes(BRUSH_BITS), "brushlabels": ["d"]}, 8, 6)
    entry = only(label_studio(tmp_path / "ls.json", [brush]))
    assert entry.names == ("1a2b3c4d-part.png", "part.png") and entry.stated_size == (8, 6)
    expected = np.zeros((6, 8), bool)
    expected[1, 2:4] = True
    assert (rasterise(entry, (8, 6)) == expected).all()
    # Percent of a 10 x 10 image: x 20% -> 2, 50% -> 5; y 10% -> 1, 30% -> 3: the rectangle (2,1)-(5,3), 4 x 3 = 12.
    points = [[20, 10], [50, 10], [50, 30], [20, 30]]
    polygon = ls_result("polygonlabels", {"points": points, "polygonlabels": ["d"]}, 10, 10)
    choice = {"type": "choices", "value": {"choices": ["scratch"]}}  # image-level: ignored
    entry = only(label_studio(tmp_path / "p.json", [polygon, choice], image="/data/local-files/?d=line%201/part.png"))
    assert entry.names == ("part.png",)
    mask = rasterise(entry, (10, 10))
    assert mask.sum() == 12 and mask[1:4, 2:6].all()


def test_label_studio_region_types_it_does_not_read_are_named(tmp_path):
    keypoint = ls_result("keypointlabels", {"x": 10, "y": 10}, 10, 10)
    with pytest.raises(AnnotationError, match=r"task 12 annotations\[0\].result\[0\] \(keypointlabels\)"):
        read_annotation_file(label_studio(tmp_path / "k.json", [keypoint]))
    with pytest.raises(AnnotationError, match="not a labelme file"):
        read_annotation_file(write_json(tmp_path / "other.json", {"settings": 1}))


def test_one_mask_rule_by_value_for_8_and_16_bit(tmp_path):
    # 8-bit: defect where value > 127. 16-bit: value * 255 / 65535 > 127, i.e. value > 127 * 257 = 32639.
    Image.fromarray(np.array([[0, 127, 128, 255] * 4] * 16, np.uint8)).save(tmp_path / "m8.png")
    Image.fromarray(np.array([[0, 32639, 32640, 65535] * 4] * 16, np.uint16)).save(tmp_path / "m16.png")
    for name in ("m8.png", "m16.png"):
        decoded = decode_image(tmp_path / name, what="mask")
        assert mask_defect(decoded, 127)[0, :4].tolist() == [False, False, True, True]
        assert mask_defect(decoded)[0, :4].tolist() == [False, True, True, True]  # null: any non-zero
    # A two-level mask means what it says whatever the threshold: 0 and 1 (a labelling script's mask) marks its 1s.
    Image.fromarray(np.array([[0, 1] * 8] * 16, np.uint8)).save(tmp_path / "m01.png")
    assert mask_defect(decode_image(tmp_path / "m01.png", what="mask"), 127).sum() == 8 * 16  # half of 16 x 16


@pytest.mark.parametrize(
    ("name", "doc", "says"),
    [  # files made to crash or exhaust a reader: each refused by name, never more than its own entry
        ("deep", "[" * 100_000 + "]" * 100_000, "RecursionError"),
        ("far", {"shapes": [shape("polygon", [[0, 0], [1e308, 5], [-1e308, 10]])], "imagePath": "p.png"}, "1e\\+06"),
        ("coco-id", {"images": [{"id": [1], "file_name": "p.png"}], "annotations": []}, r"images\[0\].id: an id"),
        (
            "ls-nan",
            [{"data": {"image": "p.png"}, "annotations": [{"result": [
                ls_result("rectanglelabels", {"x": "nan", "y": 1, "width": 2, "height": 2}, 8, 6)]}]}],
            "finite numbers",
        ),
        (
            "ls-count",  # its first 32 bits state 2^32 - 1 values (17 GB of uint32); an 8 x 6 RGBA layer has 192
            [{"data": {"image": "p.png"}, "annotations": [{"result": [
                ls_result("brushlabels", {"format": "rle", "rle": [255] * 8}, 8, 6)]}]}],
            "rle holds 4294967295 values, an RGBA layer of the image has 192",
        ),
    ],
)  # fmt: skip
def test_hostile_annotation_files_are_refused_without_crashing(tmp_path, name, doc, says):
    path = tmp_path / f"{name}.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(AnnotationError, match=says):
        for entry in read_annotation_file(path):
            rasterise(entry, (8, 6))
