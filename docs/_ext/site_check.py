"""The built site as a reader sees it, at 1280 px and on a phone: headless
Chromium (Debian's ``chromium`` package) loads each page type and measures
its layout; ``--shots DIR`` also saves a screenshot of each.

What fails the check, at both widths:

* the page is wider than the window (a table, an image or a notebook's
  HTML output runs off the page instead of scrolling inside its own box);
* a block of code or output is wider than its box and the box cannot
  scroll sideways: its end is cut off, with no way to reach it;
* from 600 px up, a block of code scrolls sideways instead of wrapping;
* a table is wider than its container and neither it nor a box around it
  inside the text column scrolls sideways (cut off the same way);
* a word of a table header is split across two lines ("eng.iterat" over
  "e").

What may scroll, and is listed: code on a phone (docs/stylesheets/extra.css),
printed output (text blocks: tables of figures, reports) at any width, and
tables wider than the column.

How it measures: a small page served beside the site (same origin) loads
the page in an iframe of the given width, walks its DOM, and writes what
it found into its own DOM, which ``chromium --dump-dom`` prints.

Run: ``python docs/_ext/site_check.py [SITE] [--shots DIR]`` after
``make docs``; ``make test-docs`` runs it when ``chromium`` is installed
(``apt install chromium``).
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

# One page of each type: the home page, a page of prose, a guide page, the
# API reference, the benchmarks, and a gallery notebook.
PAGES = {
    "home": "index.html",
    "getting-started": "getting-started.html",
    "guide": "guide/tour.html",
    "api": "api/engine.html",
    "benchmarks": "benchmarks.html",
    "notebook": "gallery/quickstart.html",
}
WIDTHS = {"desktop": 1280, "phone": 390}
# From this width up code wraps instead of scrolling (extra.css's media query).
WRAPS_FROM = 600
PROBE = "/__site_check__.html"

_SCRIPT = """
<!doctype html><html><body>
<iframe id="page" src="%(page)s" style="width: %(width)dpx; height: 900px; border: 0"></iframe>
<script>
const frame = document.getElementById("page");
frame.onload = () => {
  const d = frame.contentDocument;
  const win = frame.contentWindow;
  const found = {
    overflow: d.documentElement.scrollWidth - %(width)d,
    cut: [], scrolling: [], tables_cut: [], tables_scrolling: [], headers_broken: [],
  };
  const scrolls = (el) => /auto|scroll/.test(win.getComputedStyle(el).overflowX);
  const content = d.querySelector(".md-content") || d.body;
  // The nearest box, the element itself included, that scrolls sideways
  // inside the page's content column; null if none does.
  const scroller = (el) => {
    for (let e = el; e !== null && e !== content; e = e.parentElement) {
      if (scrolls(e)) return e;
    }
    return null;
  };
  const longest = (text) =>
    text.split("\\n").reduce((a, b) => (b.length > a.length ? b : a), "").trim().slice(0, 100);
  // Code: wider than its box is fine where the box scrolls; cut off where
  // it cannot (its end hidden, no way to reach it).
  for (const box of d.querySelectorAll("pre, pre > code")) {
    if (box.scrollWidth <= box.clientWidth + 1 || box.offsetParent === null) continue;
    const line = longest(box.textContent);
    if (!scrolls(box)) {
      found.cut.push(line);
      continue;
    }
    const block = box.closest("div[class*=language-], .highlight-ipynb");
    const kind = block === null ? "" : block.className;
    const code = /language-(python|bash|sh|console)|hl-python/.test(kind)
      || box.closest(".doc-contents") !== null;  // a docstring's example
    found.scrolling.push((code ? "code: " : "output: ") + line);
  }
  // Tables the same way: one wider than its container must scroll in a
  // box of its own (the table itself or a wrapper inside the content).
  for (const table of d.querySelectorAll(".md-typeset table")) {
    if (table.offsetParent === null) continue;
    const head = longest(table.rows.length ? table.rows[0].textContent.replace(/\\s+/g, " ") : "");
    const box = scroller(table);
    if (box !== null) {
      if (box.scrollWidth > box.clientWidth + 1) found.tables_scrolling.push(head);
      continue;
    }
    const right = table.getBoundingClientRect().right;
    const edge = Math.min(
      table.parentElement.getBoundingClientRect().right, content.getBoundingClientRect().right
    );
    if (table.scrollWidth > table.clientWidth + 1 || right > edge + 1) found.tables_cut.push(head);
  }
  // A word of a table header, or of a cell's inline code, split across two
  // lines ("eng.iterat" / "e").
  for (const th of d.querySelectorAll(".md-typeset th, .md-typeset td code")) {
    if (th.offsetParent === null) continue;
    const walker = d.createTreeWalker(th, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node !== null; node = walker.nextNode()) {
      for (const m of node.data.matchAll(/\\S+/g)) {
        const range = d.createRange();
        range.setStart(node, m.index);
        range.setEnd(node, m.index + m[0].length);
        const tops = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
        if (tops.size > 1) found.headers_broken.push(m[0]);
      }
    }
  }
  const out = document.createElement("pre");
  out.id = "found";
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
};
</script></body></html>
"""


def serve(site: str) -> http.server.ThreadingHTTPServer:
    """The site, and the probe page, on 127.0.0.1 (a free port)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith(PROBE):
                query = dict(p.split("=", 1) for p in self.path.split("?", 1)[1].split("&"))
                body = (
                    _SCRIPT % {"page": html.escape(query["page"]), "width": int(query["width"])}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                super().do_GET()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=site)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def chromium(*args: str, timeout: float = 60) -> str:
    """Run headless Chromium in a profile of its own; its stdout."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                CHROMIUM,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    return proc.stdout


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"


def measure(base: str, page: str, width: int) -> dict:
    url = f"{base}{PROBE}?page=/{page}&width={width}"
    dom = chromium("--window-size=1400,1000", "--virtual-time-budget=15000", "--dump-dom", url)
    match = re.search(r'<pre id="found">(.*?)</pre>', dom, re.S)
    if match is None:
        raise RuntimeError(f"{page} at {width} px: the probe found nothing (did it load?)")
    return json.loads(html.unescape(match.group(1)))


def check(site: str, shots: str | None = None) -> list[str]:
    """The problems found on ``site``'s pages (empty: none); screenshots
    into ``shots`` when given."""
    server = serve(site)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    problems: list[str] = []
    try:
        for kind, page in PAGES.items():
            for device, width in WIDTHS.items():
                found = measure(base, page, width)
                where = f"{page} at {width} px"
                if found["overflow"] > 0:
                    problems.append(f"{where}: the page is {found['overflow']} px too wide")
                for line in found["cut"]:
                    problems.append(f"{where}: code cut off at the edge: {line!r}")
                if width >= WRAPS_FROM:
                    for line in found["scrolling"]:
                        if line.startswith("code: "):
                            problems.append(f"{where}: code scrolls instead of wrapping: {line!r}")
                for head in found["tables_cut"]:
                    problems.append(f"{where}: table cut off at the edge: {head!r}")
                for word in found["headers_broken"]:
                    problems.append(f"{where}: a table header or cell code breaks inside {word!r}")
                print(
                    f"{where:32} wider than the page: {max(found['overflow'], 0)} px; "
                    f"cut off: {len(found['cut'])} code, {len(found['tables_cut'])} tables; "
                    f"words broken mid-word in tables: {len(found['headers_broken'])}; "
                    f"scrolling in their box: {len(found['scrolling'])} code or output, "
                    f"{len(found['tables_scrolling'])} tables"
                )
                for line in found["scrolling"]:
                    print(f"    scrolls: {line[:72]!r}")
                for head in found["tables_scrolling"]:
                    print(f"    table scrolls: {head[:66]!r}")
                if shots:
                    os.makedirs(shots, exist_ok=True)
                    chromium(
                        f"--window-size={width},{1400 if width > 800 else 1600}",
                        f"--screenshot={os.path.join(shots, f'{kind}-{device}.png')}",
                        f"{base}/{page}",
                    )
    finally:
        server.shutdown()
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default="site", help="the built site (make docs)")
    parser.add_argument("--shots", help="save a screenshot of each page type here")
    opts = parser.parse_args()
    if shutil.which(CHROMIUM) is None:
        print("site_check: no chromium here (apt install chromium); the layout is not checked")
        return 0
    problems = check(opts.site, opts.shots)
    for p in problems:
        print("site_check:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
