"""A figure's text drawn by Pillow onto the Agg raster: the report page's PNG in a fraction of the time.

Agg renders every glyph of every text artist anew on each draw (about 40 us a glyph, so a
page with 1,300 characters spends 150 ms of its 220 ms there); Pillow's FreeType text,
from the same TrueType files matplotlib found for each artist, takes about 7 ms for the
same page. So the PNG is drawn in two passes: matplotlib draws everything but the text
(grid, traces, heatmap), then :func:`draw_text_with_pillow` writes each text artist at
the pixel position, size, weight, colour and alignment matplotlib gives it. The PDF keeps
matplotlib's own text (vector, searchable).

Artists this cannot reproduce exactly (rotated text, a background box, mathtext) are left to
matplotlib: :func:`pillow_drawable` says which ones to take.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.text import Text
    from PIL import Image, ImageFont

__all__ = ["draw_text_with_pillow", "pillow_drawable"]

#: matplotlib's line spacing when an artist says "normal" (a multiple of the font's "lp" ascent).
_NORMAL_LINESPACING = 1.2


def pillow_drawable(fig: Figure) -> list[Text]:
    """The figure's visible, non-empty text artists that Pillow can draw as matplotlib would."""
    chosen = []
    # the figure's and the axes' own texts: ``findobj`` would also build every axis's ticks
    for artist in [*fig.texts, *(t for ax in fig.axes for t in ax.texts)]:
        text = artist.get_text()
        if (
            text
            and artist.get_visible()
            and artist.get_rotation() == 0
            and artist.get_bbox_patch() is None
            and not artist.get_usetex()
            and "$" not in text  # mathtext
        ):
            chosen.append(artist)
    return chosen


@lru_cache(maxsize=64)
def _font(path: str, size_px: int) -> ImageFont.FreeTypeFont:
    from PIL import ImageFont

    return ImageFont.truetype(path, size_px)


def draw_text_with_pillow(image: Image.Image, artists: list[Text], dpi: float) -> None:
    """Write ``artists`` (laid out on a figure drawn at ``dpi``) onto ``image``, the figure's raster."""
    from matplotlib import colors
    from matplotlib.font_manager import findfont
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    height = image.height
    for artist in artists:
        prop = artist.get_fontproperties()
        font = _font(findfont(prop), max(1, round(prop.get_size_in_points() * dpi / 72.0)))
        rgba = colors.to_rgba(artist.get_color(), artist.get_alpha())
        fill = tuple(round(c * 255) for c in rgba)
        x, y = artist.get_transform().transform(artist.get_unitless_position())
        y = height - y  # matplotlib counts pixels up from the bottom, Pillow down from the top
        lines = artist.get_text().split("\n")
        left, top, right, bottom = font.getbbox("lp", anchor="ls")
        ascent, descent = -top, bottom
        given = getattr(artist, "_linespacing", None)  # matplotlib has no public getter
        spacing = float(given) if isinstance(given, (int, float)) else _NORMAL_LINESPACING
        step = ascent * spacing
        block_h = ascent + step * (len(lines) - 1) + descent
        va = artist.get_verticalalignment()
        if va == "top":
            first_baseline = y + ascent
        elif va == "bottom":
            first_baseline = y - block_h + ascent
        elif va == "center":
            first_baseline = y - block_h / 2 + ascent
        else:  # baseline / center_baseline: the first line sits on y
            first_baseline = y
        widths = [draw.textlength(line, font=font) for line in lines]
        block_w = max(widths)
        ha = artist.get_horizontalalignment()
        block_left = x - {"left": 0.0, "center": block_w / 2, "right": block_w}.get(ha, 0.0)
        multi = getattr(artist, "_multialignment", None) or ha  # as matplotlib: the block's alignment by default
        for i, (line, width) in enumerate(zip(lines, widths)):
            if not line:
                continue
            offset = {"left": 0.0, "center": (block_w - width) / 2, "right": block_w - width}.get(multi, 0.0)
            draw.text((block_left + offset, first_baseline + i * step), line, font=font, fill=fill, anchor="ls")
