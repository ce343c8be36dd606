"""COCO-format annotations, read and checked: the format CVAT, Label Studio, Roboflow and FiftyOne export.

A data folder holds ``annotations/instances_train.json`` and ``annotations/instances_val.json``; each image's
``file_name`` is relative to the folder (or to ``images/``, where exporters put them). Every annotation is checked
before anything trains, each field that training or COCOeval reads by its type and range (COCOeval trusts them): ids
are integers (bool is not one), ``bbox`` four finite numbers, ``iscrowd`` the integer 0 or 1, ``area`` a finite number
>= 0, image sizes positive integers, category names distinct. A box outside its image, a box of zero area, an unknown
category or image, a key given twice in the file is a ValueError naming the annotation file and the annotation's id
(the image files are checked by [`repvgg.detection.data`][repvgg.detection.data]). Crowd annotations
(``iscrowd: 1``) are not trained on, and COCOeval ignores detections matched to them, as COCO's tools do. The
generated scenes ([`coco_from_scenes`][repvgg.detection.coco.coco_from_scenes]) take the same form, so one code
path trains and scores both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from repvgg.dense.scenes import SHAPE_CLASSES, SyntheticConfig, scene
from repvgg.io.card import check_class_names
from repvgg.limits import MAX_ANNOTATION_BYTES, MAX_IMAGE_PIXELS, brief, check_float, check_generated_scenes, parse_json
from repvgg.training.progress import preparing

__all__ = ["ANNOTATION_FILES", "CocoSet", "check_coco", "coco_from_scenes", "read_coco"]

#: The annotation file of each split, inside the data folder.
ANNOTATION_FILES = {"train": "annotations/instances_train.json", "val": "annotations/instances_val.json"}
#: How far (pixels) a box may reach past its image's border, as exporters round: clipped, not refused.
BORDER_TOLERANCE = 1.0


@dataclass
class CocoSet:
    """A checked annotation set.

    Attributes:
        source: the annotation file (or ``"generated scenes"``), named in messages.
        images: per image, its COCO record (``id``, ``file_name``, ``width``, ``height``).
        boxes: per image, the non-crowd boxes ``(N, 4)`` as ``x1, y1, x2, y2`` pixels (float32).
        labels: per image, their classes ``(N,)`` as indices into ``classes`` (int64).
        category_ids: COCO category id of each class index.
        classes: category names, by class index (categories sorted by id).
        gt: the COCO dictionary itself (``images``, ``annotations``, ``categories``), for COCOeval.
    """

    source: str
    images: list[dict[str, Any]]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    category_ids: list[int]
    classes: list[str]
    gt: dict[str, Any]


def read_coco(path: str | os.PathLike[str]) -> CocoSet:
    """Read and check a COCO instances file (at most ``repvgg.limits.MAX_ANNOTATION_BYTES``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no annotation file {path}: a COCO data folder holds "
                                f"{' and '.join(ANNOTATION_FILES.values())}")
    size = path.stat().st_size
    if size > MAX_ANNOTATION_BYTES:
        raise ValueError(f"{path} holds {size:,} bytes, more than the {MAX_ANNOTATION_BYTES:,} an annotation file "
                         "may hold")
    return check_coco(parse_json(path.read_bytes(), str(path), max_bytes=MAX_ANNOTATION_BYTES), str(path))


#: The largest id or size a COCO field may hold: COCOeval keeps ids in 64-bit arrays.
MAX_ID = 2**63 - 1


def _records(data: Any, key: str, source: str, fields: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """``data[key]``: a list of objects with the ``fields`` of the given types (bool is not an int; an int is from 0
    to [`MAX_ID`][repvgg.detection.coco.MAX_ID])."""
    records = data.get(key) if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ValueError(f"{source} is not a COCO instances file: it has no list {key!r}")
    for record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{source}: an entry of {key!r} is not an object: {brief(record)}")
        for name, kind in fields.items():
            value = record.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{source}: {key} entry {brief(record.get('id'))} has no valid {name!r} "
                                 f"(got {brief(value)})")
            if isinstance(value, int) and not 0 <= value <= MAX_ID:
                raise ValueError(f"{source}: {key} entry {brief(record.get('id'))} has {name} {brief(value)}; COCO's "
                                 f"ids and sizes are integers from 0 to {MAX_ID}")
    return records


def _categories(data: dict[str, Any], source: str) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """The categories sorted by id, their ids and their names; ids and names are each given once (a name given
    twice would make two classes that predictions cannot tell apart)."""
    categories = sorted(_records(data, "categories", source, {"id": int, "name": str}), key=lambda c: c["id"])
    ids = [c["id"] for c in categories]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"{source}: categories must be non-empty with distinct ids, got {brief(ids)}")
    named: dict[str, int] = {}
    for category in categories:
        if category["name"] in named:
            raise ValueError(f"{source}: categories {named[category['name']]} and {category['id']} are both named "
                             f"{brief(category['name'])}; predictions could not tell them apart: rename or merge one")
        named[category["name"]] = category["id"]
    return categories, ids, check_class_names(list(named), f"{source}: category names")


def _images(data: dict[str, Any], source: str) -> dict[int, dict[str, Any]]:
    images = _records(data, "images", source, {"id": int, "file_name": str, "width": int, "height": int})
    by_id: dict[int, dict[str, Any]] = {}
    for image in images:
        w, h = image["width"], image["height"]
        if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS:
            raise ValueError(f"{source}: image {image['id']} declares {w}x{h} pixels; an image needs 1 to "
                             f"{MAX_IMAGE_PIXELS:,}")
        if image["id"] in by_id:
            raise ValueError(f"{source}: image id {image['id']} appears twice")
        by_id[image["id"]] = image
    return by_id


def _finite(value: Any) -> bool:
    """Whether ``value`` is a finite number within float range: bool is no number, and a 400-digit integer, which
    ``float`` refuses with an OverflowError, is out of range."""
    try:
        check_float(value, "a coordinate")
    except ValueError:
        return False
    return True


def _box(annotation: dict[str, Any], image: dict[str, Any], where: str) -> tuple[float, float, float, float]:
    """The annotation's ``x1, y1, x2, y2``, clipped to the image within the tolerance, or a ValueError."""
    bbox = annotation.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_finite(v) for v in bbox)):
        raise ValueError(f"{where}: bbox must be four finite numbers [x, y, width, height], got {brief(bbox)}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: the box {brief(bbox)} has zero area; remove it or give it a width and a height")
    width, height, tol = image["width"], image["height"], BORDER_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise ValueError(f"{where}: the box {brief(bbox)} lies outside the {width}x{height} image; fix or remove it")
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{where}: the box {brief(bbox)} has no area inside the {width}x{height} image")
    return x1, y1, x2, y2


def _scored(annotation: dict[str, Any], box_area: float, image_area: float, where: str) -> dict[str, Any]:
    """The annotation as COCOeval reads it: ``iscrowd`` the integer 0 or 1 (default 0) and ``area`` a finite number
    from 0 to the image's area (default: the box's), each checked here, since COCOeval trusts them (``"0"`` would be
    a crowd to training and an object to COCOeval; an area over 1e10 an object it ignores)."""
    crowd = annotation.get("iscrowd", 0)
    if isinstance(crowd, bool) or not isinstance(crowd, int) or crowd not in (0, 1):
        raise ValueError(f"{where}: iscrowd must be 0 or 1 (an integer), got {brief(crowd)}")
    area = annotation.get("area", box_area)
    try:
        area = check_float(area, "area", low=0, high=image_area)
    except ValueError:
        raise ValueError(f"{where}: area must be a finite number from 0 to the image's {image_area:g} pixels (the "
                         "object's area in pixels, which COCOeval sorts into small, medium and large), got "
                         f"{brief(area)}") from None
    return dict(annotation, area=area, iscrowd=crowd)


def check_coco(data: Any, source: str) -> CocoSet:
    """Check a COCO instances dictionary (see the module's rules: every field that training or COCOeval reads, by
    type and range) and gather each image's boxes and classes."""
    categories, category_ids, classes = _categories(data, source)
    class_of = {cid: i for i, cid in enumerate(category_ids)}
    images = _images(data, source)
    annotations = _records(data, "annotations", source, {"id": int, "image_id": int, "category_id": int})
    per_image: dict[int, list[tuple[tuple[float, float, float, float], int]]] = {i: [] for i in images}
    scored: dict[int, dict[str, Any]] = {}
    for annotation in annotations:
        aid = annotation["id"]
        if aid in scored:
            raise ValueError(f"{source}: annotation id {aid} appears twice")
        if annotation["image_id"] not in images:
            raise ValueError(f"{source}: annotation {aid} refers to image {annotation['image_id']}, which is not "
                             "among the file's images")
        if annotation["category_id"] not in class_of:
            raise ValueError(f"{source}: annotation {aid} has category {annotation['category_id']}, which is not "
                             f"among the file's categories {brief(category_ids)}")
        image = images[annotation["image_id"]]
        where = f"{source}: annotation {aid} (image {image['id']}, {image['file_name']})"
        box = _box(annotation, image, where)
        scored[aid] = _scored(annotation, float(annotation["bbox"][2]) * float(annotation["bbox"][3]),
                              float(image["width"]) * float(image["height"]), where)
        if not scored[aid]["iscrowd"]:
            per_image[annotation["image_id"]].append((box, class_of[annotation["category_id"]]))
    records = list(images.values())
    boxes = [np.asarray([b for b, _ in per_image[r["id"]]], np.float32).reshape(-1, 4) for r in records]
    labels = [np.asarray([c for _, c in per_image[r["id"]]], np.int64) for r in records]
    gt = {"images": records, "categories": categories, "annotations": list(scored.values())}
    return CocoSet(source, records, boxes, labels, category_ids, classes, gt)


def coco_from_scenes(config: SyntheticConfig, split: str) -> CocoSet:
    """The generated scenes of ``split`` as a COCO annotation set (images named ``scene_<index>.png``, which are
    rendered, not read; categories 1-4 are the shapes). Each scene is rendered here, to find its boxes: their number
    is bounded first ([`check_generated_scenes`][repvgg.limits.check_generated_scenes]) and the work is shown."""
    count = check_generated_scenes(config.num_train if split == "train" else config.num_val, f"synthetic_{split}")
    size = config.image_size
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in preparing(range(count), count, f"generating the {split} scenes"):
        images.append({"id": index + 1, "file_name": f"scene_{index}.png", "width": size, "height": size})
        drawn = scene(config, split, index)
        for box, cls in zip(drawn.boxes.tolist(), drawn.classes.tolist()):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": cls,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": i, "name": name} for i, name in enumerate(SHAPE_CLASSES) if i > 0]
    return check_coco({"images": images, "annotations": annotations, "categories": categories}, "generated scenes")
