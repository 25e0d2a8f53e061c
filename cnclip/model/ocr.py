"""Reading the words in a picture: PP-OCR text detection, direction and recognition.

The reader is RapidOCR (`rapidocr`, pinned in pyproject.toml), whose wheel carries the PP-OCRv6
Chinese/English detection and recognition models and the direction classifier as ONNX files: it
reads with no download, and on a bare server (it uses opencv-python-headless, which needs no
libGL). The models run in ONNX Runtime, or in OpenVINO where the CPU has fast bf16 (AMX, AVX-512
BF16): OpenVINO then computes in bf16 on its own and reads a photo in half the time (see
`default_engine`). Only this module touches RapidOCR, through its documented options, call and
result fields, so a change in them (which crashed Immich's OCR in 2025) shows up here and in
tests/model/test_ocr.py, nowhere else. Torch-free: `cnclip index` can read words in a process
that never loads torch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cnclip import faults
from cnclip.errors import CNClipError, ImageError, ReaderError
from cnclip.model.cpu import cpu_has_fast_bf16, openvino_available
from cnclip.model.transform import DEFAULT_MAX_PIXELS, load_image

log = logging.getLogger(__name__)

RAPIDOCR_VERSION = "3.10.0"
# What an index records per photo read, so a later reader can tell which results are whose.
READER = f"rapidocr-{RAPIDOCR_VERSION}/PP-OCRv6-small"
# Pictures are read at most this many pixels on their long side: a 12 MP JPEG (4000 px) decodes
# straight at 2000 px (DCT scaling), where the lines found are cut out sharp enough to recognise.
DEFAULT_READ_SIDE = 2000
# The detector, the cost of every picture with or without words, sees less: 736 px on the long
# side (0.14 s for a 4:3 photo on 2 cores, against 0.61 s at 1600 px), and more for tall or wide
# pictures (screenshots, panoramas), so that their lines keep about as many pixels of height.
DETECT_SIDE = 736
TALL_ASPECT = 1.6  # from this ratio of long to short side a picture counts as tall
TALL_DETECT_SIDE = 960
MIN_SCORE = 0.5  # recognitions below this confidence are noise more often than words
# Every call names all three stages: RapidOCR keeps the ones a call names for the calls after it.
_STAGES = {"use_det": True, "use_cls": True, "use_rec": True}

ENGINES = ("onnxruntime", "openvino")
ENGINE_ENV = "CNCLIP_OCR_ENGINE"  # onnxruntime/openvino: which one runs the reader's models
# The ONNX files in the pinned wheel that the OpenVINO engine is pointed at (RapidOCR finds them
# itself for ONNX Runtime; for OpenVINO it would download its own converted copies instead).
_MODEL_FILES = {
    "Det": "PP-OCRv6_det_small.onnx",
    "Rec": "PP-OCRv6_rec_small.onnx",
    "Cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
}


def default_engine() -> str:
    """The engine that runs the reader's models when none is named: `$CNCLIP_OCR_ENGINE`, else
    OpenVINO on a CPU with fast bf16, where it computes in bf16 by itself (on a 2-core AVX-512 BF16
    EPYC it read a 12 MP photo in 0.10 s against ONNX Runtime's 0.21 s, with the same recall), else ONNX
    Runtime (OpenVINO held to fp32 on that CPU was under 10 % faster: not worth a second engine)."""
    forced = os.environ.get(ENGINE_ENV, "").strip().lower()
    if forced:
        if forced not in ENGINES:
            raise ReaderError(f"${ENGINE_ENV}={forced!r} is not a reader engine; use one of: {', '.join(ENGINES)}")
        return forced
    if cpu_has_fast_bf16() and openvino_available():
        return "openvino"
    return "onnxruntime"


def model_files() -> dict[str, Path]:
    """The reader's ONNX models inside the installed rapidocr wheel, by RapidOCR's stage name."""
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or spec.origin is None:
        raise ReaderError(f"reading words in photos needs rapidocr: pip install 'rapidocr=={RAPIDOCR_VERSION}'")
    folder = Path(spec.origin).parent / "models"
    return {stage: folder / name for stage, name in _MODEL_FILES.items()}


@dataclass(frozen=True)
class Line:
    """One line of text found in a picture: the words, the recognizer's confidence (0-1), and
    the four corners (x, y) of its box in the picture's pixels, clockwise from top left."""

    text: str
    score: float
    box: tuple[tuple[int, int], ...]

    def to_dict(self) -> dict:
        return {"text": self.text, "score": round(self.score, 4), "box": [list(p) for p in self.box]}

    @classmethod
    def from_dict(cls, d: dict) -> Line:
        return cls(str(d["text"]), float(d["score"]), tuple((int(x), int(y)) for x, y in d["box"]))


class WordReader:
    """Reads the lines of text in pictures. The models load on first use (~0.6 s); one reader
    serves many threads, one picture at a time (the engine already uses every core). `engine`:
    "onnxruntime" or "openvino" (default: `default_engine()`)."""

    def __init__(
        self,
        max_side: int = DEFAULT_READ_SIDE,
        min_score: float = MIN_SCORE,
        detect_side: int = DETECT_SIDE,
        tall_detect_side: int = TALL_DETECT_SIDE,
        engine: str | None = None,
    ) -> None:
        if min(max_side, detect_side, tall_detect_side) < 32:
            raise CNClipError("reading sizes must be at least 32 px")
        # OpenVINO picked for this CPU (not asked for) falls back to ONNX Runtime if it cannot load
        self._fallback = engine is None and not os.environ.get(ENGINE_ENV, "").strip()
        self.engine = default_engine() if engine is None else engine
        if self.engine not in ENGINES:
            raise ReaderError(f"{self.engine!r} is not a reader engine; use one of: {', '.join(ENGINES)}")
        if self.engine == "openvino" and not openvino_available():
            raise ReaderError("the openvino reader engine needs OpenVINO: pip install openvino (or use onnxruntime)")
        self.max_side = max_side
        self.min_score = min_score
        self.detect_side, self.tall_detect_side = detect_side, tall_detect_side
        self._engines: dict[int, object] = {}  # by the detector's side: RapidOCR fixes it per engine
        self._lock = threading.Lock()

    def _load(self, detect_side: int | None = None):
        """The engine whose detector sees `detect_side` pixels on the long side (default: photos'),
        its models loaded. Raises ReaderError when they cannot be: that is no picture's fault."""
        side = detect_side or self.detect_side
        if side not in self._engines:
            try:
                self._engines[side] = self._start(side)
            except ReaderError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever the engine raises, the reader cannot run
                if not (self.engine == "openvino" and self._fallback):
                    other = f", or set ${ENGINE_ENV}=onnxruntime" if self.engine == "openvino" else ""
                    raise ReaderError(
                        f"the word reader could not load its models in {self.engine} ({type(e).__name__}: {e}); "
                        f"photos stay searchable by picture: fix this and run `cnclip index --ocr-only`{other}"
                    ) from e
                log.warning(
                    "OpenVINO could not load the word reader's models (%s: %s); reading in ONNX Runtime",
                    type(e).__name__,
                    e,
                )
                self.engine, self._fallback, self._engines = "onnxruntime", False, {}
                return self._load(side)
        return self._engines[side]

    def _start(self, side: int):
        """A RapidOCR engine for `side`, its three models loaded now rather than at the first
        picture with words, so that a failure to load them is told apart from a picture's."""
        faults.point("words.load_reader")
        try:
            from rapidocr import EngineType, RapidOCR
        except ImportError as e:
            raise ReaderError(
                f"reading words in photos needs rapidocr: pip install 'rapidocr=={RAPIDOCR_VERSION}' "
                "(or index with --no-ocr)"
            ) from e
        # Its own logger prints every model path at INFO; a library here stays quiet.
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        engine_params = {}
        if self.engine == "openvino":
            for stage, file in model_files().items():
                engine_params[f"{stage}.engine_type"] = EngineType.OPENVINO
                engine_params[f"{stage}.model_path"] = str(file)
            # one picture at a time, as fast as it can go (not throughput over parallel requests)
            engine_params["EngineConfig.openvino.performance_hint"] = "LATENCY"
        engine = RapidOCR(
            params=engine_params
            | {
                "Global.log_level": "error",
                "Global.text_score": self.min_score,
                # our `max_side` already bounds the picture; theirs would shrink it again at 2000
                "Global.max_side_len": max(self.max_side, 2000),
                # the detector shrinks the picture to `side` (never enlarges it); the lines it
                # finds are cut from the picture as given, for recognition
                "Det.limit_type": "max",
                "Det.limit_side_len": side,
                # ONNX Runtime's memory arena keeps buffers between pictures: the detector ran
                # 15 % faster (0.076 s against 0.089 s a photo here); RapidOCR turns it off
                "EngineConfig.onnxruntime.enable_cpu_mem_arena": True,
            }
        )
        # RapidOCR loads each model at its first use: the detector on any picture, the direction
        # classifier and the recognizer on a line. A blank line loads the last two.
        blank = np.full((48, 192, 3), 255, dtype=np.uint8)
        engine(blank, **_STAGES)
        engine(blank, use_det=False, use_cls=True, use_rec=True)
        return engine

    def read_file(self, path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Line]:
        """The lines in an image file (decoded as for embedding: upright per EXIF, HEIC, ...).
        Raises ImageError for a file that cannot be decoded."""
        # JPEGs decode straight at about the reading size (DCT scaling), not at 12 MP
        image = load_image(path, max_pixels=max_pixels, draft_size=self.max_side // 2)
        return self.read(image, full_size=_upright_size(path))

    def read(self, image: Image.Image, full_size: tuple[int, int] | None = None) -> list[Line]:
        """The lines of text in `image`, top to bottom as the detector orders them; boxes in the
        pixels of `full_size` when the image was decoded smaller than that (default: its own)."""
        image = image.convert("RGB")
        scale = 1.0 if full_size is None else max(image.size) / max(full_size)
        if max(image.size) > self.max_side:
            shrink = self.max_side / max(image.size)
            size = (max(1, round(image.width * shrink)), max(1, round(image.height * shrink)))
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
            scale *= shrink
        tall = max(image.size) >= TALL_ASPECT * min(image.size)
        with self._lock:
            engine = self._load(self.tall_detect_side if tall else self.detect_side)
            try:
                result = engine(image, **_STAGES)
            except Exception as e:  # noqa: BLE001 - a third-party reader's failure is one photo's, not the run's
                raise ImageError(f"the word reader failed on this picture ({type(e).__name__}: {e})") from e
        texts = result.txts or ()
        if not texts:
            return []
        lines = []
        for text, score, box in zip(texts, result.scores, result.boxes, strict=True):
            text = str(text).strip()
            if not text or float(score) < self.min_score or (len(text) == 1 and text.isascii()):
                continue  # a lone Latin letter or digit is texture read as text more often than a word
            corners = tuple((round(float(x) / scale), round(float(y) / scale)) for x, y in box)
            lines.append(Line(text, float(score), corners))
        return lines


def _upright_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """The picture's size as shown (EXIF rotation applied), from its header; None if unreadable."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap the sides
    except (OSError, ValueError, SyntaxError):
        return None
    return (height, width) if turned else (width, height)


_default: WordReader | None = None
_default_lock = threading.Lock()


def default_reader() -> WordReader:
    """The process's shared reader (its models load once)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = WordReader()
        return _default
