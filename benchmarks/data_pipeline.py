"""Data-loading speed of the training loaders, next to the model's own training speed.

    .venv/bin/python benchmarks/data_pipeline.py          # about 5 minutes on 2 CPU cores

Does data or compute limit a run? For each loader and 0, 1 and 2 worker processes this measures images/s
over whole epochs of a generated folder, after a warm-up epoch (persistent workers already started),
alternating the loaders compared, median of the repeats. Next to it: the model's training images/s
(forward, backward and SGD step on random input of the same size, median of steps).

Classification: a folder of 224x224 JPEGs (smooth random scenes, quality 90) in 4 classes. Ours is
``repvgg train``'s loader (one scan of the tree, ``CheckedImageFolder``, timm's ``create_transform``
resolved for repvgg_a0, per-sample seeds, ``training.engine.train_loader``); timm's is ``create_loader``
on timm's ``ImageDataset`` with the same transform settings (``use_prefetcher=False``: on a CPU both
normalise in the workers).

Segmentation: 512x1024 JPEG images with class-id PNG labels, crop 512, random scale 0.5-2.0, flip. Ours
is ``repvgg seg-train``'s (``torchvision.transforms.v2`` on uint8, normalisation last); "float32" is the
pipeline repvgg used before, re-created below as it was: the whole image converted to float32 and
normalised first, then scaled, padded, cropped and flipped in float32, labels read as int64 and checked
with ``np.unique``.

Results: benchmarks/results/data_pipeline.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from repvgg.nn.registry import build_model
from repvgg.report import markdown_table
from repvgg.segmentation.data import build_segmentation_data, find_pairs
from repvgg.segmentation.pspnet import create_segmenter, segmentation_loss
from repvgg.segmentation.transforms import IMAGENET_MEAN, IMAGENET_STD
from repvgg.serialization import write_json, write_text
from repvgg.training.data import build_datasets, load_rgb
from repvgg.training.distributed import DistContext
from repvgg.training.engine import train_loader

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = 4
SEG_CLASSES = 8
log = logging.getLogger("data_pipeline")


# --- generated data -------------------------------------------------------------------------------


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth colour fields, some edges, a little noise (JPEG-compressible)."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8))
    image = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_classification_folder(root: Path, per_class: int, *, size: int = 224, seed: int = 0) -> Path:
    """``root/{train,val}/class<k>/<i>.jpg``: ``per_class`` training and 8 validation images per class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", 8)):
        for k in range(CLASSES):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_smooth_image(rng, size, size)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def write_segmentation_folder(root: Path, count: int, *, size: tuple[int, int] = (512, 1024),
                              seed: int = 0) -> Path:
    """``root/images/{train,val}/*.jpg`` and ``root/labels/{train,val}/*.png`` with ellipses and boxes."""
    rng = np.random.default_rng(seed)
    height, width = size
    palette = rng.integers(0, 256, (SEG_CLASSES, 3))
    for split, n in (("train", count), ("val", 2)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = Image.new("L", (width, height), 0)
            draw = ImageDraw.Draw(label)
            for _ in range(12):
                x0, y0 = int(rng.integers(0, width - 64)), int(rng.integers(0, height - 64))
                box = (x0, y0, x0 + int(rng.integers(32, 400)), y0 + int(rng.integers(32, 300)))
                cls = int(rng.integers(1, SEG_CLASSES))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=cls)
            ids = np.asarray(label)
            image = 0.6 * palette[ids] + 0.4 * _smooth_image(rng, height, width)
            Image.fromarray(image.astype(np.uint8)).save(root / "images" / split / f"{i:04d}.jpg", quality=90)
            label.save(root / "labels" / split / f"{i:04d}.png")
    (root / "classes.txt").write_text("".join(f"class{k}\n" for k in range(SEG_CLASSES)))
    return root


# --- the loaders compared -------------------------------------------------------------------------

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


Loader = tuple[DataLoader, Callable[[int], None] | None]  # a loader and what moves it to an epoch


def our_classification_loader(root: Path, batch: int, workers: int) -> Loader:
    from timm.data import resolve_data_config

    with torch.device("meta"):
        probe = build_model("repvgg_a0")
    bundle = build_datasets(str(root), img_size=224, data_config=resolve_data_config({}, model=probe))
    loader, sampler = train_loader(bundle.train, seed=0, ctx=CPU, local_batch=batch, workers=workers)
    return loader, sampler.set_epoch


def timm_classification_loader(root: Path, batch: int, workers: int) -> Loader:
    from timm.data import ImageDataset, create_loader, resolve_data_config

    with torch.device("meta"):
        probe = build_model("repvgg_a0")
    cfg = resolve_data_config({}, model=probe)
    return create_loader(ImageDataset(str(root / "train")), input_size=(3, 224, 224), batch_size=batch,
                         is_training=True, interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"],
                         color_jitter=None,  # off, as in repvgg train's default (the paper's recipe)
                         num_workers=workers, use_prefetcher=False, persistent_workers=workers > 0,
                         device=torch.device("cpu")), None


def our_segmentation_loader(root: Path, batch: int, workers: int) -> Loader:
    bundle = build_segmentation_data(root, crop_size=512, scale_range=(0.5, 2.0))
    loader, sampler = train_loader(bundle.train, seed=0, ctx=CPU, local_batch=batch, workers=workers)
    return loader, sampler.set_epoch


class Float32SegmentationFolder(Dataset):
    """The segmentation input pipeline repvgg used before ``transforms.v2``, as it was (for comparison only)."""

    def __init__(self, root: Path, num_classes: int, crop: int, scale_range: tuple[float, float]) -> None:
        self.pairs = find_pairs(root, "train")
        self.num_classes, self.crop, self.scale_range = num_classes, crop, scale_range
        self.mean = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, label_path = self.pairs[index]
        image_np = np.asarray(load_rgb(image_path))
        with Image.open(label_path) as img:
            label_np = np.asarray(img).astype(np.int64)
        ids = np.unique(label_np)
        if (ids[ids != 255] >= self.num_classes).any():
            raise ValueError(f"{label_path}: class id out of range")
        image = torch.from_numpy(image_np.copy()).permute(2, 0, 1).float().div_(255)
        image = (image - self.mean) / self.std
        label = torch.from_numpy(label_np)
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(()).item()
        h, w = image.shape[-2:]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        pad_h, pad_w = max(0, self.crop - size[0]), max(0, self.crop - size[1])
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=255)
        h, w = image.shape[-2:]
        top = int(torch.randint(0, h - self.crop + 1, ()).item())
        left = int(torch.randint(0, w - self.crop + 1, ()).item())
        image = image[:, top:top + self.crop, left:left + self.crop]
        label = label[top:top + self.crop, left:left + self.crop]
        if torch.rand(()).item() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image, label


def float32_segmentation_loader(root: Path, batch: int, workers: int) -> Loader:
    dataset = Float32SegmentationFolder(root, SEG_CLASSES, 512, (0.5, 2.0))
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0)), None


# --- measuring ------------------------------------------------------------------------------------


def epoch_rate(loader: Loader, epoch: int) -> float:
    """Images per second over one pass of the loader."""
    loader, set_epoch = loader
    if set_epoch is not None:
        set_epoch(epoch)
    images = 0
    start = time.perf_counter()
    for batch in loader:
        images += len(batch[0])
    return images / (time.perf_counter() - start)


def compare_loaders(builders: dict[str, Callable[[Path, int, int], Loader]], root: Path, batch: int,
                    workers: int, repeats: int) -> dict[str, float]:
    """Median images/s of each loader; the loaders alternate, after one warm-up epoch each."""
    loaders = {name: build(root, batch, workers) for name, build in builders.items()}
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for name, loader in loaders.items():
        epoch_rate(loader, 0)  # starts the workers, fills the page cache
    for rep in range(repeats):
        for name, loader in loaders.items():
            rates[name].append(epoch_rate(loader, rep + 1))
    del loaders  # ends the persistent workers
    return {name: statistics.median(values) for name, values in rates.items()}


def training_rate(model: nn.Module, make_batch: Callable[[], tuple[Tensor, Tensor]],
                  loss_fn: Callable[[Any, Tensor], Tensor], steps: int) -> float:
    """The model's training images/s: median over ``steps`` timed steps after one warm-up step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    times = []
    for step in range(steps + 1):
        images, targets = make_batch()
        start = time.perf_counter()
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


def describe_machine() -> str:
    """CPU model, its widest vector extension and the core count (so a reader can scale the numbers)."""
    cpu, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{cpu} ({isa}), {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=128, help="training JPEGs per class (4 classes)")
    parser.add_argument("--seg-images", type=int, default=48, help="512x1024 training pairs")
    parser.add_argument("--workers", default="0,1,2", help="worker counts to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-steps", type=int, default=4, help="timed training steps per model")
    parser.add_argument("--data", type=Path, default=None,
                        help="an empty folder to generate the data in (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    worker_counts = [int(w) for w in args.workers.split(",")]
    if args.data is not None and args.data.exists() and any(args.data.iterdir()):
        parser.error(f"--data {args.data} is not empty; give a new or empty folder")
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        log.info("generating data in %s", data)
        cls_root = write_classification_folder(data / "classification", args.per_class)
        seg_root = write_segmentation_folder(data / "segmentation", args.seg_images)

        log.info("model training speed")
        classifier = build_model("repvgg_a0", num_classes=CLASSES)
        cls_model = training_rate(classifier, lambda: (torch.randn(32, 3, 224, 224),
                                                       torch.randint(0, CLASSES, (32,))),
                                  nn.CrossEntropyLoss(), args.model_steps)
        segmenter = create_segmenter("repvgg_tiny", SEG_CLASSES, head_channels=64, aux_channels=32)
        seg_model = training_rate(segmenter, lambda: (torch.randn(4, 3, 512, 512),
                                                      torch.randint(0, SEG_CLASSES, (4, 512, 512))),
                                  segmentation_loss, args.model_steps)
        del classifier, segmenter

        rows: list[dict[str, Any]] = []
        for workers in worker_counts:
            log.info("classification loaders, %d worker(s)", workers)
            rates = compare_loaders({"ours": our_classification_loader, "timm": timm_classification_loader},
                                    cls_root, 64, workers, args.repeats)
            rows.append({"task": "classification", "input": "224x224 JPEG", "workers": workers,
                         "ours": rates["ours"], "reference": "timm create_loader", "reference_rate": rates["timm"],
                         "model": "repvgg_a0 at 224, batch 32", "model_rate": cls_model})
        for workers in worker_counts:
            log.info("segmentation loaders, %d worker(s)", workers)
            rates = compare_loaders({"ours": our_segmentation_loader, "float32": float32_segmentation_loader},
                                    seg_root, 8, workers, args.repeats)
            rows.append({"task": "segmentation", "input": "512x1024 JPEG + PNG, crop 512", "workers": workers,
                         "ours": rates["ours"], "reference": "previous float32 pipeline",
                         "reference_rate": rates["float32"], "model": "PSPNet repvgg_tiny at 512x512, batch 4",
                         "model_rate": seg_model})

    table = markdown_table(
        ["task", "input", "workers", "ours (img/s)", "compared with", "its img/s", "ours / it",
         "model training (img/s)"],
        [[r["task"], r["input"], r["workers"], f"{r['ours']:.0f}", r["reference"], f"{r['reference_rate']:.0f}",
          f"{r['ours'] / r['reference_rate']:.2f}x", f"{r['model_rate']:.1f} ({r['model']})"] for r in rows],
    )
    machine = describe_machine()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "data_pipeline.json", {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
        "torch": torch.__version__, "repeats": args.repeats, "rows": rows,
    })
    write_text(args.out / "data_pipeline.md", table + "\n")
    print(table)
    print(json.dumps({"machine": machine}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
