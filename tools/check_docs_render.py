"""Render every page of the built docs site in headless Chromium and check that it reads well.

Each page is served over local HTTP, rendered at a 1400 px wide window, and measured by a small
script injected into the page. The check fails on:

- a table wider than the content column (its right-hand columns would be hidden behind a scroll
  bar); code blocks may scroll and are not checked;
- an image that does not load;
- an image shown at less than ``MIN_IMAGE_SCALE`` of its own width: a plot drawn wider than the
  column has its labels shrunk with it, below a readable size.

Usage::

    python -m mkdocs build --strict --site-dir site
    python tools/check_docs_render.py site --json render.json

The report lists each page's widest table against the column width. Chromium is looked up as
``chromium``, ``chromium-browser`` or ``google-chrome`` on PATH, or taken from ``--chromium``.
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

WINDOW_WIDTH = 1400
WINDOW_HEIGHT = 1000
MIN_IMAGE_SCALE = 0.75

# Runs in the page once it has loaded and Material's scripts have wrapped the tables. The result
# goes into the DOM, which Chromium's --dump-dom prints.
_MEASURE = """
<script>
window.addEventListener("load", () => setTimeout(() => {
  const column = document.querySelector(".md-content__inner") || document.body;
  const style = getComputedStyle(column);
  const columnWidth = column.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const tables = [...column.querySelectorAll("table")].map((table, index) => {
    const head = table.querySelector("tr");
    return {
      index: index,
      width: Math.max(table.scrollWidth, table.getBoundingClientRect().width),
      columns: head ? head.children.length : 0,
      first_cell: head && head.children.length ? head.children[0].textContent.trim().slice(0, 40) : "",
      heading: (() => {
        let node = table;
        while (node && node !== column) {
          let previous = node.previousElementSibling;
          while (previous) {
            if (/^H[1-6]$/.test(previous.tagName)) return previous.textContent.replace("¶", "").trim();
            previous = previous.previousElementSibling;
          }
          node = node.parentElement;
        }
        return "";
      })(),
    };
  });
  const images = [...column.querySelectorAll("img")].map((image) => ({
    src: image.getAttribute("src"),
    loaded: image.complete && image.naturalWidth > 0,
    shown_width: image.getBoundingClientRect().width,
    natural_width: image.naturalWidth,
  }));
  const out = document.createElement("pre");
  out.id = "render-check-result";
  out.textContent = JSON.stringify({
    viewport: window.innerWidth, column: columnWidth, tables: tables, images: images,
  });
  document.body.appendChild(out);
}, 300));
</script>
"""


class _InjectingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site; HTML pages get the measuring script before ``</body>``."""

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        if path.suffix != ".html" or not path.is_file():
            return super().send_head()
        body = path.read_text(encoding="utf-8").replace("</body>", _MEASURE + "</body>", 1).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


def find_chromium(explicit: str | None) -> str:
    for name in [explicit] if explicit else ["chromium", "chromium-browser", "google-chrome"]:
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit(
        "check_docs_render: no Chromium found; install Debian's `chromium` package or pass --chromium PATH"
    )


def render(chromium: str, url: str, profile: str, timeout: float) -> dict:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW_WIDTH},{WINDOW_HEIGHT}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    found = re.search(r'<pre id="render-check-result">(.*?)</pre>', done.stdout, re.S)
    if found is None:
        raise RuntimeError(
            f"{url}: the page did not report its measurements (Chromium exit {done.returncode}); "
            f"stderr tail:\n{done.stderr[-2000:]}"
        )
    return json.loads(html.unescape(found[1]))


def pages(site: Path) -> list[Path]:
    skip = {"404.html"}
    return sorted(
        path for path in site.rglob("*.html") if path.name not in skip and "assets" not in path.relative_to(site).parts
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the folder `mkdocs build` wrote")
    parser.add_argument("--chromium", help="the Chromium binary (default: looked up on PATH)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per page (default 60)")
    args = parser.parse_args(argv)

    chromium = find_chromium(args.chromium)
    site = args.site.resolve()
    handler = functools.partial(_InjectingHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"

    results: dict[str, dict] = {}
    failures: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as profile:
            for path in pages(site):
                page = path.relative_to(site).as_posix()
                measured = render(chromium, base + page, profile, args.timeout)
                results[page] = measured
                column = measured["column"]
                for table in measured["tables"]:
                    if table["width"] > column + 1:
                        failures.append(
                            f"{page}: table {table['index']} under '{table['heading']}' "
                            f"({table['columns']} columns, first '{table['first_cell']}') is "
                            f"{table['width']:.0f} px wide in a {column:.0f} px column"
                        )
                for image in measured["images"]:
                    if not image["loaded"]:
                        failures.append(f"{page}: image {image['src']} did not load")
                    elif image["shown_width"] < MIN_IMAGE_SCALE * image["natural_width"]:
                        failures.append(
                            f"{page}: image {image['src']} is {image['natural_width']} px wide, shown at "
                            f"{image['shown_width']:.0f} px ({image['shown_width'] / image['natural_width']:.0%}): "
                            f"its text shrinks with it; draw it at most {column / MIN_IMAGE_SCALE:.0f} px wide"
                        )
    finally:
        server.shutdown()

    print(f"{'page':<34} {'column':>7} {'widest table':>13} {'tables':>7} {'images':>7}")
    for page, measured in results.items():
        widest = max((table["width"] for table in measured["tables"]), default=0)
        print(
            f"{page:<34} {measured['column']:>7.0f} {widest:>13.0f} "
            f"{len(measured['tables']):>7} {len(measured['images']):>7}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if failures:
        print(f"\n{len(failures)} render problem(s) at {WINDOW_WIDTH} px:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    print(f"\nevery page renders within its column at {WINDOW_WIDTH} px, every image loads at a readable scale")
    return 0


if __name__ == "__main__":
    sys.exit(main())
