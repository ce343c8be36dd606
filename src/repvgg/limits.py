"""Bounds on everything an input can make this package allocate, and the one check of each.

Flags, config fields, file metadata, JSON and YAML text, decoded images and the batches they make are all
checked here, before anything is built or allocated: an input of 100,000 x 100,000 pixels would ask for
hundreds of GB; a file declaring 40,000 layers per stage would take minutes to describe; a 300-byte YAML file
of nested aliases expands to gigabytes. A value outside its bounds is a [`LimitExceeded`][repvgg.limits.LimitExceeded]
(a ``ValueError``) naming the option and the limit. The ceilings are generous for real use: the paper trains at
224 and evaluates segmentation at 1024 x 2048 crops of 713 and 1024; RepVGG-B3 has 16 layers in its deepest
stage and 2,560 channels in its widest.

Nothing here imports torch: the command line checks its flags before loading it.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
from typing import Any, Sequence

__all__ = ["ACTIVATION_FACTOR", "LimitExceeded", "MAX_BATCH_SIZE", "MAX_CHANNELS", "MAX_CLASSES", "MAX_CONFIG_BYTES",
           "MAX_GENERATED_SCENES", "MAX_IMAGE_PIXELS", "MAX_IMG_SIZE", "MAX_JSON_BYTES", "MAX_LR", "MAX_NESTING",
           "MAX_RESIZE", "MAX_STAGE_DEPTH", "MAX_WORKERS", "MEMORY_SHARE", "MIN_OPSET", "SCENE_RECORD_BYTES", "brief",
           "check_batch_memory", "check_float", "check_generated_scenes", "check_image_pixels", "check_img_size",
           "check_int", "check_parameter_memory", "check_unique", "check_workers", "machine_memory", "nesting_depth",
           "parse_json"]

#: Largest input side (pixels) of any command: training, evaluation, export, benchmarks.
MAX_IMG_SIZE = 4096
#: Most layers in one stage of a RepVGG spec.
MAX_STAGE_DEPTH = 256
#: Most channels in one layer of a RepVGG spec.
MAX_CHANNELS = 16384
#: Oldest ONNX opset ``repvgg export`` writes (the ``torch.export``-based exporter's own minimum).
MIN_OPSET = 18
#: Most pixels of one image, decoded or resized for a model (8192 x 8192; a 48-megapixel photo fits). A 16-bit
#: PNG of 13,000 x 13,000 pixels compresses to a few hundred KB and decodes to gigabytes.
MAX_IMAGE_PIXELS = 8192 * 8192
#: The longest side a model's preprocessing may resize an image to before its crop (a square image then has the most
#: pixels allowed).
MAX_RESIZE = math.isqrt(MAX_IMAGE_PIXELS)
#: Most class names a file may declare (ImageNet-21k has 21,843).
MAX_CLASSES = 1_000_000
#: The largest learning rate a run accepts (the paper's is 0.1 at batch 256; a larger one is a typo).
MAX_LR = 1000.0
#: The largest global batch a training run accepts (the largest published ImageNet batches are 64k).
MAX_BATCH_SIZE = 2**20
#: Most generated scenes of one split. Detection renders each training and validation scene once before training, to
#: know its boxes (about 7 ms each at 128 x 128 on one core): 100,000 take about 12 minutes.
MAX_GENERATED_SCENES = 100_000
#: What one generated scene's boxes and COCO records hold in memory while a run lasts (measured: 4 KiB at its peak,
#: with up to four shapes; rounded up for the allocator).
SCENE_RECORD_BYTES = 6 * 1024
#: The most data-loading processes a run starts.
MAX_WORKERS = 256
#: Most bytes of one JSON text a file or a flag holds (class names, preprocessing, a model spec).
MAX_JSON_BYTES = 16 * 2**20
#: Largest COCO annotation file read (COCO 2017's training annotations are 448 MB).
MAX_ANNOTATION_BYTES = 2**30
#: Most bytes of a ``--config`` file.
MAX_CONFIG_BYTES = 2**20
#: Deepest nesting of lists and mappings in JSON or YAML input (a config or a spec needs 3).
MAX_NESTING = 32
#: A forward pass holds activations several times the size of its input (RepVGG's first stage alone is four
#: times its input, and a training-time block has three branches): the input batch times this is what a batch
#: is taken to need.
ACTIVATION_FACTOR = 16
#: The share of this machine's memory one batch may be taken to need.
MEMORY_SHARE = 0.5


class LimitExceeded(ValueError):
    """An input asks for more than its bound (an image, a batch, a nested text): refused before allocating."""


def brief(value: Any, limit: int = 80) -> str:
    """A ``repr`` of ``value`` of at most ``limit`` characters, built without formatting all of it: a message never
    echoes an unbounded input."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxlist, shortener.maxdict, shortener.maxtuple = 3, 8, 8, 8
    shortener.maxstring = shortener.maxother = limit
    text = shortener.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_int(value: Any, name: str, *, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; otherwise a ValueError naming ``name`` and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {brief(value)}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {allowed}, got {brief(value)}")
    return value


def check_float(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in its range (``low_open`` / ``high_open`` exclude the ends); otherwise a
    ValueError naming ``name`` and the range. NaN and infinities are never a setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {brief(value)}")
    number = float(value) if abs(value) < 1e308 else math.inf
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if not math.isfinite(number) or below or above:
        ends = [f"{'>' if low_open else '>='} {low:g}" if low is not None else "",
                f"{'<' if high_open else '<='} {high:g}" if high is not None else ""]
        allowed = " and ".join(e for e in ends if e) or "finite"
        raise ValueError(f"{name} must be a finite number {allowed}, got {brief(value)}")
    return number


def check_workers(value: Any, name: str = "workers", *, batches: int | None = None) -> int:
    """Data-loading processes: from 0 to [`MAX_WORKERS`][repvgg.limits.MAX_WORKERS], and no more than the ``batches``
    they will load (a process that would get no batch is not started)."""
    workers = check_int(value, name, low=0, high=MAX_WORKERS)
    return workers if batches is None else min(workers, max(0, batches))


def check_img_size(value: Any, name: str = "img_size", *, low: int = 8) -> int:
    """An input side in pixels: at least ``low`` and at most [`MAX_IMG_SIZE`][repvgg.limits.MAX_IMG_SIZE]."""
    return check_int(value, name, low=low, high=MAX_IMG_SIZE)


def check_image_pixels(width: int, height: int, what: str) -> None:
    """Refuse an image of more than [`MAX_IMAGE_PIXELS`][repvgg.limits.MAX_IMAGE_PIXELS] pixels, from its header or
    before a resize makes it.

    Raises:
        LimitExceeded: naming ``what`` (the file, or the resize a model's preprocessing asks for).
    """
    if width < 1 or height < 1:
        raise ValueError(f"{what} has no pixels ({width} x {height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise LimitExceeded(f"{what} is {width:,} x {height:,} pixels ({width * height / 1e6:,.1f} megapixels), "
                            f"more than the {MAX_IMAGE_PIXELS / 1e6:.1f} megapixels an image may have "
                            "(repvgg.limits.MAX_IMAGE_PIXELS); resize it first")


def machine_memory() -> int | None:
    """This machine's memory in bytes, or the control group's limit or the process's address-space limit
    (``ulimit -v``) where one is lower (``None``: unknown)."""
    import resource

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    if address_space != resource.RLIM_INFINITY:
        total = address_space if total is None else min(total, address_space)
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = int(text) if total is None else min(total, int(text))
    return total


def check_batch_memory(batch: int, shape: tuple[int, ...], option: str, *, element_bytes: int = 4,
                       memory: int | None = None, held: bool = False, per: str = "", input_size: bool = True) -> None:
    """Refuse a batch of ``batch`` inputs of ``shape`` (e.g. ``(3, H, W)``) whose forward pass would need more
    than [`MEMORY_SHARE`][repvgg.limits.MEMORY_SHARE] of ``memory`` (default:
    [`machine_memory`][repvgg.limits.machine_memory]), counting [`ACTIVATION_FACTOR`][repvgg.limits.ACTIVATION_FACTOR]
    times the input; ``held`` images are only kept (calibration images), not run at once. ``per`` says what the
    batch is (e.g. `` per micro-batch``); ``input_size=False`` where the input size is the model's, not a choice.

    Raises:
        LimitExceeded: naming ``option`` and what to lower.
    """
    memory = machine_memory() if memory is None else memory
    per_input = math.prod(shape) * element_bytes * (1 if held else ACTIVATION_FACTOR)
    needed = batch * per_input
    if memory is not None and needed > MEMORY_SHARE * memory:
        fits = max(0, int(MEMORY_SHARE * memory // per_input))
        use = "to hold them" if held else "for one forward pass"
        raise LimitExceeded(f"{option} {batch:,}{per} of {'x'.join(map(str, shape))} inputs would need about "
                            f"{_size(needed)} {use}, and this machine has {_size(memory)}; lower {option} (at most "
                            f"{fits:,}{per} at this input size){' or the input size' if input_size else ''}")


def check_generated_scenes(count: int, option: str, *, memory: int | None = None) -> int:
    """``count`` generated scenes, from 1 to [`MAX_GENERATED_SCENES`][repvgg.limits.MAX_GENERATED_SCENES], whose records
    ([`SCENE_RECORD_BYTES`][repvgg.limits.SCENE_RECORD_BYTES] each) fit in [`MEMORY_SHARE`][repvgg.limits.MEMORY_SHARE]
    of ``memory`` (default: [`machine_memory`][repvgg.limits.machine_memory]).

    Raises:
        LimitExceeded: naming ``option`` and how many would fit.
    """
    check_int(count, option, low=1)
    if count > MAX_GENERATED_SCENES:
        raise LimitExceeded(f"{option} {count:,}: each generated scene is rendered before training, to find its boxes "
                            f"(about 7 ms a scene at 128 x 128); give at most {MAX_GENERATED_SCENES:,} "
                            "(repvgg.limits.MAX_GENERATED_SCENES), or train on a COCO folder (--data)")
    memory = machine_memory() if memory is None else memory
    held = count * SCENE_RECORD_BYTES
    if memory is not None and held > MEMORY_SHARE * memory:
        raise LimitExceeded(f"{option} {count:,} generated scenes would hold about {_size(held)} of boxes and records, "
                            f"and this machine has {_size(memory)}; give at most "
                            f"{int(MEMORY_SHARE * memory // SCENE_RECORD_BYTES):,}")
    return count


def check_parameter_memory(parameters: int, what: str, *, memory: int | None = None) -> None:
    """Refuse a model of ``parameters`` float32 parameters that would need more than
    [`MEMORY_SHARE`][repvgg.limits.MEMORY_SHARE] of ``memory`` (default:
    [`machine_memory`][repvgg.limits.machine_memory]) to train: its weights, gradients, optimizer state and a converted
    copy, four times its weights.

    Raises:
        LimitExceeded: naming ``what`` (the model) and its size.
    """
    memory = machine_memory() if memory is None else memory
    needed = 4 * 4 * parameters
    if memory is not None and needed > MEMORY_SHARE * memory:
        raise LimitExceeded(f"{what} has about {parameters:,} parameters and would need about {_size(needed)} to "
                            f"build and train, and this machine has {_size(memory)}; choose a smaller network (its "
                            "widths, depths or number of classes)")


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:,.0f} {unit}" if unit == "bytes" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} PiB"  # pragma: no cover - the loop returns


#: Bytes of JSON text scanned at a time by [`nesting_depth`][repvgg.limits.nesting_depth] (a few MB of work arrays).
_SCAN_BLOCK = 1 << 18
_QUOTE, _BACKSLASH, _OPENING, _CLOSING = ord('"'), ord("\\"), (ord("["), ord("{")), (ord("]"), ord("}"))


def nesting_depth(text: str | bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in JSON ``text`` (brackets inside strings do not count), found
    without parsing it: a parser recurses once per level. The text is scanned in vectorized blocks (numpy), so 16 MB
    take a fraction of a second, in short calls that let other threads run (a server's event loop goes on
    answering)."""
    import numpy as np

    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    depth = deepest = 0
    in_string = escaped = 0  # carried from one block to the next
    for start in range(0, len(data), _SCAN_BLOCK):
        chars = np.frombuffer(data, np.uint8, count=min(_SCAN_BLOCK, len(data) - start), offset=start)
        at = np.arange(len(chars), dtype=np.int32)
        # a character is escaped when an odd run of backslashes ends just before it
        last_other = np.maximum.accumulate(np.where(chars == _BACKSLASH, -1 - escaped, at))
        odd_run = (at - last_other) & 1
        quotes = chars == _QUOTE
        quotes[1:] &= odd_run[:-1] == 0
        quotes[0] &= not escaped
        inside = (np.cumsum(quotes, dtype=np.int32) + in_string) & 1
        step = ((chars == _OPENING[0]) | (chars == _OPENING[1])).astype(np.int8)
        step -= (chars == _CLOSING[0]) | (chars == _CLOSING[1])
        step[inside == 1] = 0
        levels = depth + np.cumsum(step, dtype=np.int64)
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        in_string, escaped = int(inside[-1]), int(odd_run[-1])
    return deepest


def parse_json(text: str | bytes, what: str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse JSON ``text`` from a file or a flag, bounded first: at most ``max_bytes``
    ([`MAX_JSON_BYTES`][repvgg.limits.MAX_JSON_BYTES] unless the caller holds a larger kind of file, such as
    [`MAX_ANNOTATION_BYTES`][repvgg.limits.MAX_ANNOTATION_BYTES]) and [`MAX_NESTING`][repvgg.limits.MAX_NESTING]
    levels deep. Bytes are UTF-8, a leading byte-order mark allowed; an object that names a key twice is refused.

    Raises:
        LimitExceeded: the text is too large or too deeply nested.
        ValueError: it is not JSON, or a key is given twice (the message names ``what``, never the whole text).
    """
    if len(text) > max_bytes:
        raise LimitExceeded(f"{what} holds {len(text):,} bytes of JSON, more than the {max_bytes:,} allowed")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")  # a byte-order mark, as Windows tools write, is no content
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not UTF-8 text") from None
    if text.count("[") + text.count("{") > MAX_NESTING and nesting_depth(text) > MAX_NESTING:
        raise LimitExceeded(f"{what} nests lists or objects more than {MAX_NESTING} levels deep")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise ValueError(f"{what} gives the key {brief(err.args[0])} twice in one object; keep one (a reader "
                         "would silently take the last)") from None
    except (ValueError, RecursionError) as err:  # ValueError: also an integer of more than 4,300 digits
        raise ValueError(f"{what} is not valid JSON ({getattr(err, 'msg', None) or brief(str(err))} at character "
                         f"{getattr(err, 'pos', '?')}): {brief(text)}") from None


class _DuplicateKey(ValueError):
    """A JSON object names one key twice (``args[0]``: the key)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook`` for text this package reads: an object that names a key twice is
    refused, where ``json`` alone keeps the last value without a word."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


#: What the allocators say when memory runs out (PyTorch's CPU allocator, C++'s, CUDA's).
_ALLOCATION_FAILURES = ("can't allocate memory", "std::bad_alloc", "out of memory", "not enough memory")


def out_of_memory(err: BaseException, doing: str = "") -> Exception | None:
    """An [`OutOfMemory`][repvgg.errors.OutOfMemory] saying what to lower when ``err`` is an allocation failure
    (a ``MemoryError``, or an allocator's ``RuntimeError``), else ``None``: the one place that tells them apart."""
    from repvgg.errors import OutOfMemory

    text = str(err)
    if not isinstance(err, MemoryError) and not (isinstance(err, RuntimeError) and
                                                 any(sign in text for sign in _ALLOCATION_FAILURES)):
        return None
    wanted = re.search(r"allocate (\d+) bytes", text)
    size = f" ({int(wanted.group(1)) / 2**30:.1f} GiB at once)" if wanted else ""
    memory = machine_memory()
    has = f"; this process may use about {memory / 2**30:.1f} GiB" if memory else ""
    return OutOfMemory(f"ran out of memory{' ' + doing if doing else ''}{size}{has}. Lower --batch-size or "
                       "--img-size (or --calib-images, --speed-batch), or free memory, and run it again")


def check_unique(given: Sequence[str], what: str, names: Sequence[str] | None = None) -> None:
    """Refuse a list that names one thing twice (``names``: ``given`` in canonical form, e.g. registry names), which
    would be run, timed or counted twice.

    Raises:
        ValueError: naming ``what`` (e.g. ``--models``) and what was given twice.
    """
    seen: dict[str, str] = {}
    for as_given, name in zip(given, given if names is None else names):
        if name in seen:
            same = f"{seen[name]!r} and {as_given!r}" if seen[name] != as_given else repr(as_given)
            raise ValueError(f"{what} names {name} twice ({same}): give each once")
        seen[name] = as_given
