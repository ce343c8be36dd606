"""What ``repvgg quantize`` does, as typed data (its flags are made from it; no torch here)."""

from __future__ import annotations

from dataclasses import dataclass

from repvgg.limits import MAX_IMG_SIZE
from repvgg.options import RunConfig, check_device_name, option

__all__ = ["CALIBRATION_METHODS", "QuantizeConfig"]

#: ``--calibration`` names and ONNX Runtime's ``CalibrationMethod`` members.
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


@dataclass(frozen=True)
class QuantizeConfig(RunConfig):
    """Options of [`repvgg.quant.ptq.quantize_model`][repvgg.quant.ptq.quantize_model] (``repvgg quantize``)."""

    data: str | None = option(None, "ImageFolder root the model was trained on (a detector: its COCO folder)",
                              default_help="the embedded digits; a detector: the data it records")
    img_size: int | None = option(None, "input resolution",
                                  default_help="the size WEIGHTS records, else 32 digits / 224 folders", low=8,
                                  high=MAX_IMG_SIZE)
    calib_images: int = option(256, "training images (validation preprocessing) that calibrate the activations "
                                    "(detectors: 128 by default)",
                               low=1, high=100_000)
    calibration: str = option("minmax", "calibration method", choices=tuple(CALIBRATION_METHODS))
    speed_batch: int = option(8, "batch of the FP32/INT8 timing", low=1)
    speed_rounds: int = option(15, "interleaved rounds of the FP32/INT8 timing (the medians are reported)", low=1,
                               high=10_000)
    speed_img_size: int | None = option(None, "input size of the FP32/INT8 timing", default_help="--img-size",
                                        low=8, high=MAX_IMG_SIZE)
    qat_epochs: int = option(0, "quantization-aware training instead of calibration: fine-tune the converted model "
                                "this many epochs with fake INT8 (run folder OUT-qat beside OUT)", low=0)
    qat_lr: float | None = option(None, "QAT learning rate", default_help="1/10 of training's", low=0, high=1000,
                                  low_open=True)
    device: str = option("auto", "device of the QAT fine-tune: auto, cpu, cuda or cuda:N")
    runtime: str = option("auto", "runtime(s) of the FP32 vs INT8 timing; auto: ONNX Runtime and OpenVINO (if "
                                  "installed), naming the faster", choices=("auto", "onnxruntime", "openvino"))
    min_agreement: float = option(0.995, "the accuracy guard: least share of validation images on which INT8 "
                                         "predicts float32's class (not applied after --qat-epochs, which changes "
                                         "the weights on purpose)", low=0, high=1)
    max_top1_drop: float = option(0.5, "the accuracy guard: most top-1 points INT8 may lose against float32", low=0,
                                  high=100)
    max_ap_drop: float = option(1.0, "detectors: the accuracy guard: most COCO AP points INT8 may lose against "
                                      "float32", low=0, high=100)
    max_miou_drop: float = option(1.0, "segmenters: the accuracy guard: most mean-IoU points INT8 may lose against "
                                       "float32", low=0, high=100)
    overwrite: bool = option(False, "replace an existing output file and QAT run folder (a file the command reads "
                                    "is never replaced)")

    def __post_init__(self) -> None:
        self._check_types()
        check_device_name(self.device)
        self._check([
            (self.calibration in CALIBRATION_METHODS,
             f"unknown calibration method {self.calibration!r}; choose from {', '.join(CALIBRATION_METHODS)}"),
            (self.runtime in ("auto", "onnxruntime", "openvino"), "runtime must be auto, onnxruntime or openvino"),
        ])
