"""One frame made presentable: stored values → 8-bit grayscale or RGB → JPEG or PNG.

The steps follow PS3.4 N.2 in the part a viewer without a presentation state applies:
Modality LUT as Rescale Slope/Intercept, VOI as a window (from the request, else the
instance's first Window Center/Width, per frame for enhanced multi-frame objects, else the
frame's own min/max), MONOCHROME1 inverted to the usual dark-is-low display, palette colour
through its LUT, YBR decoded to RGB (pydicom does that). Then the PS3.18 8.3.5 viewport:
crop to the source region, scale to fit the viewport keeping the aspect ratio.

Compressed frames are decoded by pydicom's decoders (Pillow, pylibjpeg-openjpeg, its own RLE
decoder); a syntax none of the installed plugins handles raises RenderError(406).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import UID

from pacsd.ingest.sources import EXPLICIT_VR_LITTLE_ENDIAN
from pacsd.web.frames import FrameMap, PixelError

__all__ = ["RenderError", "Window", "Viewport", "RenderParams", "Presentation", "presentation",
           "decode", "render", "RENDERED_TYPES"]

RENDERED_TYPES = ("image/jpeg", "image/png")
MAX_VIEWPORT = 8192          # a bigger viewport is refused: it would only cost memory
DEFAULT_QUALITY = 90
THUMBNAIL = (128, 128)

_FUNCTIONS = {"LINEAR", "LINEAR_EXACT", "SIGMOID"}


class RenderError(PixelError):
    """A frame cannot be rendered as asked."""


@dataclass(frozen=True, slots=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"  # VOI LUT Function (PS3.3 C.11.2.1.2): LINEAR, LINEAR_EXACT, SIGMOID


@dataclass(frozen=True, slots=True)
class Viewport:
    width: int
    height: int
    # Source region (x, y, width, height): in pixels (WADO-RS viewport, widths may be negative
    # to flip), or as fractions of the image (WADO-URI region) when `fractions` is set.
    region: tuple[float, float, float, float] | None = None
    fractions: bool = False
    enlarge: bool = True  # False: fit into the viewport but never scale up (thumbnails)


@dataclass(frozen=True, slots=True)
class RenderParams:
    media_type: str = "image/jpeg"
    window: Window | None = None
    viewport: Viewport | None = None
    quality: int = DEFAULT_QUALITY


@dataclass(frozen=True, slots=True)
class Presentation:
    """What the header says about turning stored values into display values."""

    photometric: str
    rescale: tuple[float, float]                      # slope, intercept (all frames)
    window: Window | None                             # the instance's first window, if any
    per_frame: tuple[tuple[tuple[float, float] | None, Window | None], ...] = ()
    palette: pydicom.Dataset | None = None

    def for_frame(self, index: int) -> tuple[tuple[float, float], Window | None]:
        rescale, window = self.rescale, self.window
        if index < len(self.per_frame):
            frame_rescale, frame_window = self.per_frame[index]
            rescale = frame_rescale or rescale
            window = frame_window or window
        return rescale, window


# -- header ----------------------------------------------------------------------------------

def _first(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if not value:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _window_of(item: pydicom.Dataset) -> Window | None:
    center, width = _first(item.get("WindowCenter")), _first(item.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    function = str(item.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in _FUNCTIONS:
        function = "LINEAR"
    if function == "LINEAR" and width < 1:
        return None
    return Window(center, width, function)


def _rescale_of(item: pydicom.Dataset) -> tuple[float, float] | None:
    slope, intercept = _first(item.get("RescaleSlope")), _first(item.get("RescaleIntercept"))
    if slope is None and intercept is None:
        return None
    return (1.0 if slope is None or slope == 0 else slope), (intercept or 0.0)


def _groups(item: pydicom.Dataset) -> tuple[tuple[float, float] | None, Window | None]:
    """Rescale and window from one item of a functional groups sequence."""
    rescale = window = None
    for seq in item.get("PixelValueTransformationSequence") or ():
        rescale = _rescale_of(seq)
    for seq in item.get("FrameVOILUTSequence") or ():
        window = _window_of(seq)
    return rescale, window


_PALETTE_KEYWORDS = (
    "PhotometricInterpretation", "BitsStored", "BitsAllocated", "PixelRepresentation",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "AlphaPaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData", "AlphaPaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData", "SegmentedAlphaPaletteColorLookupTableData",
    "PaletteColorLookupTableUID",
)


def presentation(ds: pydicom.Dataset, number_of_frames: int) -> Presentation:
    photometric = str(ds.get("PhotometricInterpretation", "") or "MONOCHROME2").strip().upper()
    rescale = _rescale_of(ds) or (1.0, 0.0)
    window = _window_of(ds)
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        shared_rescale, shared_window = _groups(shared[0])
        rescale, window = shared_rescale or rescale, shared_window or window
    per_frame: tuple = ()
    frames_seq = ds.get("PerFrameFunctionalGroupsSequence")
    if frames_seq and len(frames_seq) == number_of_frames:
        per_frame = tuple(_groups(item) for item in frames_seq)
        if not any(r or w for r, w in per_frame):
            per_frame = ()
    palette = None
    if photometric == "PALETTE COLOR":
        palette = pydicom.Dataset()
        for keyword in _PALETTE_KEYWORDS:
            if keyword in ds:
                setattr(palette, keyword, ds[keyword].value)
    return Presentation(photometric, rescale, window, per_frame, palette)


# -- decoding --------------------------------------------------------------------------------

def decode(frame: bytes, frame_map: FrameMap) -> np.ndarray:
    """One frame's stored values as an array: (rows, columns) or (rows, columns, 3) RGB."""
    pixel = frame_map.pixel
    options = pixel.decode_options()
    if frame_map.encapsulated:
        uid = UID(frame_map.transfer_syntax)
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            raise RenderError(406, f"pacsd cannot render pixel data in transfer syntax {uid} "
                                   f"({uid.name}): no decoder for it") from None
        if not decoder.is_available:
            raise RenderError(406, f"pacsd cannot render pixel data in transfer syntax {uid} "
                                   f"({uid.name}): no installed decoder plugin handles it")
        source = encapsulate([frame])
    else:
        decoder = get_decoder(UID(EXPLICIT_VR_LITTLE_ENDIAN))  # frames.py hands out little endian
        source = frame
    try:
        arr, _ = decoder.as_array(source, **options)
    except Exception as exc:  # every decoder plugin failed, or the data does not fit the header
        reason = str(exc).strip().splitlines()
        raise RenderError(406, f"pacsd cannot render this frame ({frame_map.transfer_syntax}): "
                               f"{' '.join(line.strip() for line in reason)[:300]}") from None
    if not frame_map.encapsulated and arr.dtype.kind in "iu" and pixel.bits_stored < arr.dtype.itemsize * 8:
        arr = _stored_bits(arr, pixel.bits_stored, pixel.pixel_representation)
    return arr


def _stored_bits(arr: np.ndarray, bits_stored: int, signed: int) -> np.ndarray:
    # Bits above the stored ones are not pixel data (PS3.5 8.1.1; old overlays live there).
    mask = (1 << bits_stored) - 1
    values = arr.astype(np.int64) & mask
    if signed:
        values = np.where(values >= 1 << (bits_stored - 1), values - (1 << bits_stored), values)
    return values


# -- rendering -------------------------------------------------------------------------------

def _voi(values: np.ndarray, window: Window) -> np.ndarray:
    """Display values 0..1 (PS3.3 C.11.2.1.2)."""
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - c) / w, -60, 60)))
    if window.function == "LINEAR_EXACT":
        return np.clip((values - c) / w + 0.5, 0.0, 1.0)
    if w <= 1:
        return (values > c - 0.5).astype(np.float64)
    return np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


def _grayscale(arr: np.ndarray, pres: Presentation, index: int, window: Window | None) -> np.ndarray:
    (slope, intercept), own_window = pres.for_frame(index)
    values = arr.astype(np.float64)
    if (slope, intercept) != (1.0, 0.0):
        values = values * slope + intercept
    window = window or own_window
    if window is None:
        low, high = float(values.min()), float(values.max())
        window = Window((low + high) / 2, high - low, "LINEAR_EXACT") if high > low else None
    shown = _voi(values, window) if window else np.zeros(values.shape)
    if pres.photometric == "MONOCHROME1":
        shown = 1.0 - shown
    return np.rint(shown * 255.0).astype(np.uint8)


def _color(arr: np.ndarray, pres: Presentation, bits_stored: int) -> np.ndarray:
    if pres.palette is not None:
        if "RedPaletteColorLookupTableData" not in pres.palette and \
                "SegmentedRedPaletteColorLookupTableData" not in pres.palette:
            raise RenderError(406, "pacsd cannot render this palette colour image: its lookup "
                                   "tables are too large to be kept with the header")
        rgb = apply_color_lut(arr, pres.palette)
        if rgb.shape[-1] == 4:
            rgb = rgb[..., :3]
        return (rgb >> 8).astype(np.uint8) if rgb.dtype.itemsize > 1 else rgb.astype(np.uint8)
    if arr.dtype.itemsize > 1 or arr.max(initial=0) > 255:
        shift = max(0, bits_stored - 8)
        arr = np.clip(arr.astype(np.int64) >> shift, 0, 255)
    return arr.astype(np.uint8)


def _crop(image: Image.Image, viewport: Viewport) -> Image.Image:
    if viewport.region is None:
        return image
    x, y, w, h = viewport.region
    if viewport.fractions:
        x, w = x * image.width, w * image.width
        y, h = y * image.height, h * image.height
    flip_x, flip_y = w < 0, h < 0
    x0, x1 = sorted((x, x + w))
    y0, y1 = sorted((y, y + h))
    box = (max(0, round(x0)), max(0, round(y0)), min(image.width, round(x1)), min(image.height, round(y1)))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise RenderError(400, f"the source region {viewport.region} lies outside the "
                               f"{image.width} x {image.height} image")
    image = image.crop(box)
    if flip_x:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if flip_y:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def _fit(image: Image.Image, viewport: Viewport) -> Image.Image:
    scale = min(viewport.width / image.width, viewport.height / image.height)
    if not viewport.enlarge:
        scale = min(scale, 1.0)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def render(arr: np.ndarray, pres: Presentation, index: int, bits_stored: int, params: RenderParams) -> bytes:
    """Frame `index` (0-based; for per-frame values) as an encoded image of params.media_type."""
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 or pres.palette is not None:
        image = Image.fromarray(_color(arr, pres, bits_stored), "RGB")
    elif arr.ndim == 2:
        image = Image.fromarray(_grayscale(arr, pres, index, params.window), "L")
    else:
        raise RenderError(406, f"pacsd cannot render pixel data shaped {arr.shape}")
    if params.viewport is not None:
        image = _fit(_crop(image, params.viewport), params.viewport)
    out = io.BytesIO()
    if params.media_type == "image/png":
        image.save(out, format="PNG", compress_level=3)
    else:
        image.save(out, format="JPEG", quality=params.quality)
    return out.getvalue()
