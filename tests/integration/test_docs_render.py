"""tools/check_docs_render.py in headless Chromium: it passes a page that fits and fails one that does not.

`.ci/run` installs Chromium and runs the check on the real site; this proves the check can fail.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "tools" / "check_docs_render.py"
CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (.ci/run installs Debian's chromium)")


def png(width: int) -> bytes:
    """A white PNG, ``width`` x 1 pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, 1, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" + b"\xff" * width))
        + chunk(b"IEND", b"")
    )


def page(body: str) -> str:
    """A page with the theme's content column and its rule that images shrink to fit it."""
    return (
        "<html><head><style>img { max-width: 100%; }</style></head><body>"
        "<div class='md-content__inner' style='width: 600px; padding: 0 20px'>"
        f"<h1>Title</h1>{body}</div></body></html>"
    )


def check(site: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(CHECK), str(site), "--chromium", CHROMIUM]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
def test_a_page_that_fits_passes_and_a_wide_table_a_missing_image_or_a_shrunk_image_fails(tmp_path):
    site = tmp_path / "site"
    (site / "good").mkdir(parents=True)
    (site / "good" / "plot.png").write_bytes(png(500))
    (site / "good" / "index.html").write_text(
        page(
            "<table><tr><td>short</td><td>table</td></tr></table><img src='plot.png'>"
            "<pre><code>" + "a code block may scroll " * 40 + "</code></pre>"
        )  # fmt: skip
    )
    done = check(site)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every page renders within its column" in done.stdout

    (site / "wide").mkdir()
    cells = "".join(f"<td>column{i}_that_does_not_wrap</td>" for i in range(12))
    (site / "wide" / "huge.png").write_bytes(png(1500))
    (site / "wide" / "index.html").write_text(
        page(f"<h2>Wide</h2><table><tr>{cells}</tr></table><img src='gone.png'><img src='huge.png'>")
    )
    done = check(site)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "wide/index.html: table 0 under 'Wide' (12 columns" in done.stderr
    assert "px wide in a 600 px column" in done.stderr
    assert "wide/index.html: image gone.png did not load" in done.stderr
    assert "wide/index.html: image huge.png is 1500 px wide, shown at" in done.stderr
    assert "draw it at most 800 px wide" in done.stderr
    assert "good/index.html" not in done.stderr
