"""Datasets in the YOLO (ultralytics) and Pascal VOC layouts, read into COCO's annotation format (an
appendix; no torch): what data.load_coco checks and indexes for training and evaluation alike.

    COCO   DIR/annotations/instances_{train,val}2017.json, DIR/{train,val}2017/
    YOLO   DIR/data.yaml (or the .yaml file itself): `train`, `val` (folders of images, .txt lists of
           images, or lists of these; relative to `path`, or else to the .yaml's folder) and `names` (a
           list, or a dict {index: name}); for each image .../images/.../x.jpg a label file
           .../labels/.../x.txt with one `class cx cy w h` line per box, normalised to [0, 1] (or a
           polygon, `class x1 y1 x2 y2 ...`, whose enclosing box is taken, as ultralytics does); an
           image without a label file, or with an empty one, has no objects.
    VOC    DIR/Annotations/*.xml, DIR/JPEGImages/, DIR/ImageSets/Main/{train,val}.txt

Category ids follow each format's own convention: a YOLO class index is its category id (0, 1, ...,
named by `names`); VOC's class names, sorted, are numbered from 0 (the 20 VOC classes get VOC's usual
order, aeroplane = 0 ... tvmonitor = 19). VOC's pixel coordinates are 1-based and inclusive: a box
xmin..xmax covers xmax - xmin + 1 pixels from x = xmin - 1 (as detectron2 reads them). VOC's `difficult`
objects are marked crowd: left out of training, and ignored by the COCO evaluation, as COCO-style
evaluations of VOC do.
"""
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import NamedTuple

from appendix.image_io import IMAGE_SUFFIXES, DataError, stored_image_size


class Converted(NamedTuple):
    """A YOLO or VOC split in COCO's format; `source` (the data.yaml, the ImageSets list) names it in messages."""
    source: Path
    data: dict

    def __str__(self) -> str:
        return str(self.source)


def converted(data_dir: Path, split: str) -> tuple[Path, Converted] | None:
    """(image folder, Converted) of a YOLO or VOC dataset's split; None for the COCO layout."""
    layout = layout_of(data_dir)
    if layout == "yolo":
        root, data = read_yolo(data_dir, split)
        return root, Converted(yolo_yaml(data_dir), data)
    if layout == "voc":
        images, data = read_voc(data_dir, split)
        return images, Converted(data_dir / "ImageSets" / "Main" / f"{split}.txt", data)
    return None


def layout_of(data_dir: Path) -> str:
    """"coco", "yolo" or "voc": which layout `data_dir` (a folder, or a YOLO .yaml file) is in."""
    if data_dir.suffix in (".yaml", ".yml") and data_dir.is_file():
        return "yolo"
    if (data_dir / "annotations").is_dir():
        return "coco"
    if yolo_yaml(data_dir) is not None:
        return "yolo"
    if (data_dir / "Annotations").is_dir() and (data_dir / "ImageSets" / "Main").is_dir():
        return "voc"
    raise DataError(f"--data {data_dir}: no dataset layout recognised: expected annotations/instances_*2017.json "
                    f"(COCO), data.yaml (YOLO), or Annotations/ and ImageSets/Main/ (Pascal VOC)")


def yolo_yaml(data_dir: Path) -> Path | None:
    if data_dir.suffix in (".yaml", ".yml"):
        return data_dir
    found = sorted(data_dir.glob("*.yaml")) + sorted(data_dir.glob("*.yml"))
    preferred = [p for p in found if p.stem in ("data", "dataset")]
    return (preferred or found or [None])[0]


# --- YOLO ------------------------------------------------------------------------------------------------

def read_yaml(path: Path) -> dict:
    try:
        import yaml
    except ImportError:
        raise DataError(f"{path}: reading a YOLO data.yaml needs PyYAML: pip install pyyaml") from None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a YOLO data.yaml (expected keys train, val, names)")
    return data


def yolo_names(data: dict, yaml_file: Path) -> dict[int, str]:
    names = data.get("names")
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return dict(enumerate(names))
    if isinstance(names, dict) and all(str(k).isdigit() and isinstance(v, str) for k, v in names.items()):
        return dict(sorted((int(k), v) for k, v in names.items()))  # {0: a} or {"0": a}
    raise DataError(f"{yaml_file}: 'names' must be a list of class names or a dict {{index: name}}, got {names!r}")


def yolo_images(data: dict, split: str, yaml_file: Path) -> tuple[Path, list[Path]]:
    """The dataset's root and the image files of `split`, from data.yaml's entry (folders, .txt lists)."""
    root = Path(data.get("path") or ".")
    root = root if root.is_absolute() else yaml_file.parent / root
    entries = data.get(split)
    if entries is None:
        raise DataError(f"{yaml_file}: no '{split}' entry (the {split} images)")
    files = []
    for entry in entries if isinstance(entries, list) else [entries]:
        path = root / str(entry)
        if not path.exists() and str(entry).startswith("../") and (root / str(entry)[3:]).exists():
            path = root / str(entry)[3:]  # Roboflow's exports say ../train/images for a folder beside the .yaml
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix == ".txt" and path.is_file():
            lines = [line.strip() for line in names_in(path).splitlines() if line.strip()]
            files += [p if p.is_absolute() else root / p for p in map(Path, lines)]
        else:
            raise DataError(f"{yaml_file}: {split} entry {entry!r}: {path} is neither a folder of images nor a .txt list")
    return root, files


def label_file(image: Path) -> Path:
    """ultralytics' rule: the last /images/ of the path becomes /labels/, the suffix .txt."""
    parts = list(image.parts)
    if "images" not in parts:
        return image.with_suffix(".txt")
    i = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:i], "labels", *parts[i + 1:]).with_suffix(".txt")


def yolo_boxes(path: Path, size: tuple[int, int], names: dict[int, str]) -> list[tuple[int, list[float]]]:
    """(class, [x, y, width, height] in pixels) of each line of a label file; an error names file and line."""
    W, H = size
    boxes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        where = f"{path}, line {number}"
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DataError(f"{where}: {line.strip()!r} is not numbers (class cx cy w h)") from None
        if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
            raise DataError(f"{where}: {len(values)} numbers; a box is 5 (class cx cy w h), a polygon an odd "
                            f"number from 7 (class x1 y1 x2 y2 x3 y3 ...)")
        label = values[0]
        if label != int(label) or int(label) not in names:
            raise DataError(f"{where}: class {fields[0]} is not an index of 'names' ({min(names)}..{max(names)})")
        coords = values[1:]
        if any(v < 0 or v > 1 for v in coords):
            raise DataError(f"{where}: coordinates {fields[1:]} outside [0, 1]: YOLO labels are normalised by the "
                            f"image's width and height (pixel coordinates?)")
        if len(coords) == 4:
            cx, cy, w, h = coords
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            x1, x2, y1, y2 = min(coords[0::2]), max(coords[0::2]), min(coords[1::2]), max(coords[1::2])
        boxes.append((int(label), [x1 * W, y1 * H, (x2 - x1) * W, (y2 - y1) * H]))
    return boxes


def read_yolo(data_dir: Path, split: str) -> tuple[Path, dict]:
    """(image folder, COCO-format dict) of a YOLO dataset's split."""
    yaml_file = yolo_yaml(data_dir)
    data = read_yaml(yaml_file)
    names = yolo_names(data, yaml_file)
    root, files = yolo_images(data, split, yaml_file)
    images, annotations = [], []
    for image_id, file in enumerate(files, 1):
        if not file.is_file():
            raise DataError(f"{yaml_file}: {split} image {file} does not exist")
        width, height = stored_image_size(file)
        images.append({"id": image_id, "file_name": str(file.relative_to(root) if file.is_relative_to(root) else file),
                       "width": width, "height": height})
        labels = label_file(file)
        for label, box in yolo_boxes(labels, (width, height), names) if labels.is_file() else []:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": i, "name": name} for i, name in names.items()]
    return root, {"images": images, "annotations": annotations, "categories": categories}


# --- Pascal VOC -------------------------------------------------------------------------------------------

def voc_objects(xml_file: Path) -> tuple[dict, list[dict]]:
    """The image entry (file_name, width, height) and the objects (name, bbox xywh 0-based, difficult) of one
    VOC annotation file."""
    try:
        root = ElementTree.parse(xml_file).getroot()
    except (ElementTree.ParseError, OSError) as e:
        raise DataError(f"{xml_file}: not a readable VOC annotation ({e})") from None
    text = lambda node, tag: (node.findtext(tag) or "").strip()
    image = {"file_name": text(root, "filename") or xml_file.stem + ".jpg"}
    size = root.find("size")
    if size is not None and text(size, "width").isdigit() and text(size, "height").isdigit():
        image["width"], image["height"] = int(text(size, "width")), int(text(size, "height"))
    objects = []
    for number, obj in enumerate(root.iter("object"), 1):
        box = obj.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(text(box, tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError, AttributeError):
            raise DataError(f"{xml_file}: object {number} ({text(obj, 'name')!r}) has no numeric bndbox "
                            f"xmin, ymin, xmax, ymax") from None
        for low, high, a, b in (("xmin", "xmax", xmin, xmax), ("ymin", "ymax", ymin, ymax)):
            if a > b:
                raise DataError(f"{xml_file}: object {number} ({text(obj, 'name')!r}) has {low} {a:g} > {high} {b:g}")
        objects.append({"name": text(obj, "name"), "bbox": [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1],
                        "difficult": text(obj, "difficult") == "1"})
        if not objects[-1]["name"]:
            raise DataError(f"{xml_file}: object {number} has no name")
    return image, objects


def names_in(listing: Path) -> str:
    """A list of file names as text, decoded as the file system decodes names (UTF-8, and any other byte
    kept as itself): a name that is not UTF-8 still opens the file it names."""
    return listing.read_bytes().decode("utf-8", "surrogateescape")


def read_voc(data_dir: Path, split: str) -> tuple[Path, dict]:
    """(image folder, COCO-format dict) of a Pascal VOC dataset's split (ImageSets/Main/SPLIT.txt)."""
    listing = data_dir / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"--data {data_dir}: no {listing.relative_to(data_dir)} (the {split} split's image ids)")
    ids = [line.split()[0] for line in names_in(listing).splitlines() if line.strip()]
    parsed = {f.stem: voc_objects(f) for f in sorted((data_dir / "Annotations").glob("*.xml"))}  # each file once
    entries = [parsed.get(i) or voc_objects(data_dir / "Annotations" / f"{i}.xml") for i in ids]  # none: its error
    all_names = sorted({o["name"] for _, objects in parsed.values() for o in objects})
    category = {name: i for i, name in enumerate(all_names)}  # every split numbers the classes alike
    images, annotations = [], []
    for image_id, (image, objects) in enumerate(entries, 1):
        images.append({"id": image_id, **image})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category[obj["name"]],
                                "bbox": obj["bbox"], "area": obj["bbox"][2] * obj["bbox"][3],
                                "iscrowd": int(obj["difficult"])})
    categories = [{"id": i, "name": name} for name, i in category.items()]
    return data_dir / "JPEGImages", {"images": images, "annotations": annotations, "categories": categories}
