"""µm per level-0 pixel written in a TIFF slide itself, when it says so.

Read, in this order, from the first page: Aperio SVS's ``MPP = <µm>`` in the ImageDescription;
OME-XML's ``PhysicalSizeX`` (in µm unless ``PhysicalSizeXUnit`` says otherwise); the
``XResolution`` tag with ``ResolutionUnit`` centimetre or inch. Resolution tags without a unit, or
implausible for a microscope slide (outside ``PLAUSIBLE_UM_PER_PX``, e.g. the 72 dpi many programs
write by default), say nothing, and the caller must be told the scale.
"""

from __future__ import annotations

import re
from pathlib import Path

PLAUSIBLE_UM_PER_PX = (0.05, 50.0)
_MPP = re.compile(r"\bMPP\s*=\s*([0-9.eE+-]+)")
_OME_SIZE = re.compile(r'PhysicalSizeX="([0-9.eE+-]+)"')
_OME_UNIT = re.compile(r'PhysicalSizeXUnit="([^"]+)"')
_OME_UNITS = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}
_TIFF_UNITS = {"CENTIMETER": 1e4, "INCH": 25400.0}


def _plausible(value: float) -> bool:
    low, high = PLAUSIBLE_UM_PER_PX
    return low <= value <= high


def _from_description(description: str) -> tuple[float, str] | None:
    match = _MPP.search(description)
    if match:
        return float(match.group(1)), "the SVS description (MPP)"
    match = _OME_SIZE.search(description)
    if match:
        unit = _OME_UNIT.search(description)
        factor = _OME_UNITS.get(unit.group(1) if unit else "µm")
        if factor is not None:
            return float(match.group(1)) * factor, "the OME-XML PhysicalSizeX"
    return None


def _from_tags(page) -> tuple[float, str] | None:
    unit = page.tags.get("ResolutionUnit")
    resolution = page.tags.get("XResolution")
    if unit is None or resolution is None:
        return None
    name = getattr(unit.value, "name", str(unit.value))
    factor = _TIFF_UNITS.get(name)
    numerator, denominator = resolution.value
    if factor is None or not numerator or not denominator:
        return None
    return (
        factor * denominator / numerator,
        f"the TIFF XResolution tag ({numerator / denominator:g} per {name.lower()})",
    )


def tiff_um_per_px(path) -> tuple[float | None, str]:
    """``(µm per level-0 pixel, where it was read)``, or ``(None, why not)`` (module docstring)."""
    import tifffile

    path = Path(path)
    with open(path, "rb") as handle:
        if handle.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return None, f"{path.name} is not a TIFF (no resolution tags)"
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            found = _from_description(page.description or "") or _from_tags(page)
    except Exception as err:  # an unreadable file is reported by open_slide, not here
        return None, f"its tags are unreadable ({type(err).__name__})"
    if found is None:
        return None, f"{path.name} states no physical pixel size (no MPP, OME-XML or resolution unit)"
    value, source = found
    if not _plausible(value):
        return None, f"{path.name}'s {source} gives {value:.4g} µm/px, implausible for a slide (ignored)"
    return value, source
