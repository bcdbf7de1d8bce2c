"""The physical scale of a section's image, stated and recorded, and the check that the image is the one
the spots were placed on.

µm per full-resolution pixel, in this order: the sample sheet's ``um_per_px``; HEST-1k's
``pixel_size_um_estimated``; the spot diameter in µm (the sheet's ``spot_diameter_um``, else
``--spot_diameter_um``: 55 for Visium, 100 for the original ST arrays) divided by Space Ranger's
``spot_diameter_fullres`` (``scalefactors_json.json`` has no µm). An image whose size disagrees
with the scale factors (``tissue_hires_image.png`` size / ``tissue_hires_scalef``) is an error: its
spot coordinates would land in the wrong places.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from expreg.ingest.errors import IngestError

SIZE_TOLERANCE = 0.01  # relative; plus the rounding of the hires image to whole pixels


@dataclass(frozen=True)
class Scale:
    """µm per full-resolution pixel and where the number came from."""

    um_per_px: float
    source: str


def resolve_scale(spec, section, spot_diameter_um: float) -> Scale:
    """The scale of ``section``'s full-resolution pixels (see the module docstring).

    Args:
        spec: The sample's ``SampleSpec`` (sheet row).
        section: The ``Section`` read from its files.
        spot_diameter_um: ``--spot_diameter_um`` (used when the sheet gives none for the sample).
    """
    if spec.um_per_px is not None:
        return Scale(spec.um_per_px, f"sample sheet um_per_px (line {spec.line})")
    if section.um_per_px is not None:
        where = section.um_per_px_source or "the sample's metadata"
        return Scale(_positive(section.um_per_px, spec, where), where)
    fullres = (section.scalefactors or {}).get("spot_diameter_fullres")
    if fullres is not None:
        fullres = _positive(fullres, spec, "spot_diameter_fullres in scalefactors_json.json")
        if spec.spot_diameter_um is not None:
            diameter, where = spec.spot_diameter_um, f"sample sheet spot_diameter_um (line {spec.line})"
        else:
            diameter, where = spot_diameter_um, "--spot_diameter_um"
        return Scale(
            diameter / fullres,
            f"{where} {diameter:g} um / spot_diameter_fullres {fullres:g} px (scalefactors_json.json)",
        )
    raise IngestError(
        f"sample {spec.sample_id} ({spec.path}): the image scale is unknown (no scalefactors_json.json with "
        f"spot_diameter_fullres, no HEST metadata); add a um_per_px column (µm per full-resolution pixel) to "
        f"the sample sheet, line {spec.line}"
    )


def _positive(value, spec, where: str) -> float:
    """``value`` as a positive, finite float, or an error naming the sample and where it came from."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or number <= 0:
        raise IngestError(f"sample {spec.sample_id} ({spec.path}): {where} is {value!r}, not a positive number")
    return number


def check_image_size(spec, section, image_size: tuple[int, int]) -> str | None:
    """Raise when the image disagrees with the Space Ranger scale factors; returns what was checked (or None).

    The hires image is the full-resolution one scaled by ``tissue_hires_scalef``: its size divided
    by that factor must be the full-resolution size (within 1 % and the rounding to whole pixels).
    """
    scalef = (section.scalefactors or {}).get("tissue_hires_scalef")
    if not scalef or not section.hires_image:
        return None
    from PIL import Image

    scalef = _positive(scalef, spec, "tissue_hires_scalef in scalefactors_json.json")
    try:
        with Image.open(section.hires_image) as hires:
            hires_size = hires.size
    except (OSError, ValueError, SyntaxError) as err:
        raise IngestError(f"{section.hires_image}: not a readable image ({type(err).__name__}: {err})") from err
    expected = [side / float(scalef) for side in hires_size]
    tolerance = [SIZE_TOLERANCE * e + 2.0 / float(scalef) for e in expected]
    if any(abs(actual - e) > t for actual, e, t in zip(image_size, expected, tolerance)):
        raise IngestError(
            f"sample {spec.sample_id}: image {section.image} is {image_size[0]} x {image_size[1]} px, but "
            f"{section.hires_image} ({hires_size[0]} x {hires_size[1]} px) / tissue_hires_scalef {float(scalef):g} "
            f"implies a full-resolution image of about {expected[0]:.0f} x {expected[1]:.0f} px: the image is "
            "not the full-resolution image these spot positions refer to (give the right one in the sheet's "
            f"image column, line {spec.line})"
        )
    return f"{image_size[0]} x {image_size[1]} px agrees with tissue_hires_image.png / tissue_hires_scalef"
