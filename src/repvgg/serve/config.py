"""What ``repvgg serve`` does, as typed data (its flags are made from it; no torch or web stack here)."""

from __future__ import annotations

from dataclasses import dataclass

from repvgg.options import RunConfig, check_device_name, option
from repvgg.predict import DTYPES, RUNTIMES

__all__ = ["ServeConfig", "good_model_name"]


@dataclass(frozen=True)
class ServeConfig(RunConfig):
    """Options of [`create_app`][repvgg.serve.app.create_app] and ``repvgg serve``."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 opens the server to the network)")
    port: int = option(8000, "port to listen on (0: a free one, logged when the server listens)", low=0, high=65535)
    name: str | None = option(None, "the model's name in the URLs (/v2/models/NAME)",
                              default_help="the model's architecture name")
    max_batch: int = option(8, "most images one forward pass runs: concurrent requests are batched up to it", low=1,
                            high=1024)
    max_wait_ms: float = option(2.0, "longest the first request of a batch waits for others to join it", low=0,
                                high=10_000)
    max_queue: int = option(64, "most images waiting for the model; a request beyond it gets 503 with Retry-After",
                            low=1, high=100_000)
    max_body_mb: float = option(16.0, "largest request body in MB; a larger one gets 413", low=0.001, high=1024)
    topk: int = option(5, "classes /predict answers per image", low=1, high=1000)
    score_threshold: float | None = option(None, "detectors: boxes scoring below this are left out",
                                           default_help="0.3, as repvgg predict", low=0, high=1)
    runtime: str = option("auto", "auto: the fastest runtime that reproduces the model (ONNX Runtime for an ONNX "
                                  "file)", choices=RUNTIMES)
    dtype: str = option("float32", "precision of a model file; bfloat16, int8 and auto (the fastest the guard "
                                   "accepts) need --validation images", choices=DTYPES)
    validation: str | None = option(None, "images (a folder or a glob) on which a reduced precision is calibrated and "
                                          "held to the accuracy guard against float32's own predictions")
    min_agreement: float = option(0.995, "the accuracy guard: least share of --validation images on which a reduced "
                                         "precision predicts float32's class", low=0, high=1)
    max_top1_drop: float = option(0.5, "the accuracy guard: most top-1 points a reduced precision may lose",
                                  low=0, high=100)
    max_segment_mp: float = option(4.2, "a segmenter trained without --val-size runs each image at its own size, "
                                        "its memory growing with it: the largest upload it takes, in megapixels "
                                        "(a larger one gets 413)", low=0.001, high=67.2)
    decode_threads: int = option(2, "threads decoding uploaded images", low=1, high=64)
    header_timeout_s: float = option(5.0, "longest a connection may take to send a request's headers (from its "
                                          "first byte, or from connecting); a slower one is closed", low=0.01,
                                     high=3600)
    allowed_hosts: tuple[str, ...] = option((), "comma-separated Host names a server on a loopback address also "
                                                "answers (by default only localhost and loopback addresses: a web "
                                                "page elsewhere cannot reach it through DNS rebinding)")
    device: str = option("cpu", "cpu or cuda[:N] (model files)")
    classes: str | None = option(None, "a file of class names, one a line, in place of the artifact's")

    def __post_init__(self) -> None:
        self._check_types()
        check_device_name(self.device, "--device")
        self._check([(self.dtype == "float32" or self.validation is not None,
                      f"--dtype {self.dtype} is chosen under the accuracy guard, which needs --validation images "
                      "(a folder or a glob of images like the ones the server will see); or serve in float32"),
                     (self.max_queue >= self.max_batch,
                      f"--max-queue {self.max_queue} is smaller than --max-batch {self.max_batch}: a full batch could "
                      "never be queued; raise --max-queue"),
                     (self.name is None or good_model_name(self.name),
                      f"--name {self.name!r}: use letters, digits, '_', '-' and '.' (it is part of the URLs)")])

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def max_bodies(self) -> int:
        """Most request bodies being received or held at once (four times the queue: a body beyond could only wait
        for it); what they hold in memory is bounded by this times ``max_body_bytes``."""
        return 4 * self.max_queue


def good_model_name(name: str) -> bool:
    """Whether ``name`` can name a served model: part of URLs and a repository's folder name (ASCII letters, digits,
    ``_``, ``-`` and ``.``, not starting with ``.``, at most 128 characters)."""
    return 0 < len(name) <= 128 and all(c.isascii() and (c.isalnum() or c in "_-.") for c in name) and name[0] != "."
