"""The picture of where ``expreg.prepare`` cut a section's patches (``qc/<sample_id>.png``), and the scale bar
that every picture of a slide carries (``expreg.maps.pictures`` draws it on maps and thumbnails too).

One look shows what the log can only state: the patches sit on the tissue, on the spots, at the size the
fitted scale gives them (a wrong scale makes every square too large or too small, a flipped or shifted
position file puts them beside the tissue).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from expreg.ingest.patches import PatchGeometry, patch_box

PICTURE_SIDE = 1600  # longer side of the section's picture, in pixels
PATCH_RGB = (0, 170, 60)


def scale_bar_um(width_um: float) -> float:
    """A round length (1, 2 or 5 x 10^k µm) of about a fifth of ``width_um``: the scale bar of a picture that wide."""
    target = max(width_um, 1e-9) / 5
    power = 10 ** np.floor(np.log10(target))
    return float(max(m * power for m in (1, 2, 5) if m * power <= target))


def scale_label(length_um: float) -> str:
    return f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"


def _font(unit: int):
    """DejaVu Sans (matplotlib's own font: it has µ, which Pillow's default font lacks) at 6 x ``unit`` px."""
    from matplotlib import font_manager
    from PIL import ImageFont

    size = max(10, 6 * unit)
    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), size)
    except OSError:
        return ImageFont.load_default(size=size)


def draw_scale_bar(image, um_per_px: float) -> None:
    """A black scale bar with its length in µm, on a white box at the lower left of a PIL image."""
    from PIL import ImageDraw

    width, height = image.size
    length = scale_bar_um(width * um_per_px)
    bar_px, unit = max(1, round(length / um_per_px)), max(2, min(width, height) // 150)
    font = _font(unit)
    draw = ImageDraw.Draw(image)
    label = scale_label(length)
    text_w, text_h = (lambda b: (b[2] - b[0], b[3] - b[1]))(draw.textbbox((0, 0), label, font=font))
    x0, y1 = 4 * unit, height - 4 * unit
    box = (x0 - 2 * unit, y1 - text_h - 5 * unit, x0 + max(bar_px, text_w) + 2 * unit, y1 + 2 * unit)
    draw.rectangle(box, fill=(255, 255, 255))
    draw.rectangle((x0, y1 - unit, x0 + bar_px, y1), fill=(0, 0, 0))
    draw.text((x0, y1 - text_h - 3 * unit), label, fill=(0, 0, 0), font=font, anchor="lt")


def _with_caption(image, lines: list[str]):
    """``image`` below a white band holding ``lines`` (wrapped to its width)."""
    from PIL import Image, ImageDraw

    unit = max(2, image.size[0] // 240)
    font = _font(unit)
    chars = max(20, int(image.size[0] / (3.4 * unit)))  # DejaVu Sans is about 0.55 x its size wide
    wrapped = [part for line in lines for part in textwrap.wrap(line, chars)]
    line_px = 8 * unit  # 6 x unit of text, 2 of space
    canvas = Image.new("RGB", (image.size[0], image.size[1] + line_px * len(wrapped) + 2 * unit), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(wrapped):
        draw.text((2 * unit, unit + i * line_px), text, fill=(0, 0, 0), font=font, anchor="lt")
    canvas.paste(image, (0, canvas.size[1] - image.size[1]))
    return canvas


def save_patch_picture(path: Path, sample_id: str, slide, xy: np.ndarray, geom: PatchGeometry, source: str) -> None:
    """The section's image (an open ``Slide``) with the square of every patch cut from it (level-0 centres
    ``xy``, shape (n, 2)), a scale bar and a caption with the scale and where it came from, as PNG."""
    from PIL import Image, ImageDraw

    thumbnail = slide.preview(PICTURE_SIDE)
    factor = thumbnail.shape[1] / slide.level_sizes[0][0]
    picture = Image.fromarray(np.ascontiguousarray(thumbnail[..., :3]))
    draw = ImageDraw.Draw(picture)
    line = max(1, round(min(picture.size) / 600))
    for x, y in xy:
        x0, y0, w, h = patch_box(x, y, geom)
        draw.rectangle((x0 * factor, y0 * factor, (x0 + w) * factor, (y0 + h) * factor), outline=PATCH_RGB, width=line)
    draw_scale_bar(picture, geom.um_per_px / factor)
    caption = [
        f"{sample_id}: {len(xy)} patches of {geom.patch_um:g} µm ({geom.patch_px} px), {geom.um_per_px:.4g} µm per image pixel",
        f"scale: {source}",
    ]
    _with_caption(picture, caption).save(path)


def save_section_picture(path: Path, result, options, slide) -> None:
    """``save_patch_picture`` for one section of ``expreg.prepare`` (a ``SampleResult``, its ``Options`` and
    its image, open: a plain JPEG is decoded once for its patches and its picture)."""
    section, keep = result.section, result.keep
    xy = np.column_stack([np.asarray(section.x_px)[keep], np.asarray(section.y_px)[keep]])
    geom = PatchGeometry(options.patch_um, options.patch_px, result.scale.um_per_px)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_patch_picture(path, result.spec.sample_id, slide, xy, geom, result.scale.source)
