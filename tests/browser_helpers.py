"""Open a page in headless Chromium (Debian's ``chromium``) and report what it rendered.

The page is loaded in an iframe of a small checker page, whose script reads the page's DOM once it
has loaded (file pages may read each other with ``--allow-file-access-from-files``) and writes
the result into its own DOM, which ``--dump-dom`` prints. Console messages are read from
Chromium's log on stderr. No driver, no network.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
NO_CHROMIUM = ("headless Chromium is absent (`apt-get install chromium` on Debian; .ci/run installs it), "
               "so the HTML report is not checked in a browser here")

_CHECKER = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="page" src="PAGE" width="1600" height="1200"></iframe>
<script>
document.getElementById("page").addEventListener("load", () => {
  let out;
  try {
    const doc = document.getElementById("page").contentDocument;
    out = {title: doc.title, rows: doc.querySelectorAll("tbody tr").length,
           images: Array.from(doc.images).map(img => {
             const box = img.getBoundingClientRect();
             return {complete: img.complete, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
                     width: box.width, height: box.height};
           })};
  } catch (error) { out = {error: String(error)}; }
  document.getElementById("result").textContent = JSON.stringify(out);
});
</script></body></html>
"""


def chromium() -> str | None:
    """The path of a Chromium executable, or None."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def render(page: Path, *, timeout_s: float = 90) -> tuple[dict, list[str]]:
    """(what the page rendered: title, table rows, images with natural and drawn sizes; the console
    messages the page itself logged)."""
    page = Path(page).resolve()
    checker = page.parent / "_checker.html"
    checker.write_text(_CHECKER.replace("PAGE", page.name), encoding="utf-8")
    try:
        result = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", checker.as_uri()],
            capture_output=True, text=True, timeout=timeout_s)
    finally:
        checker.unlink(missing_ok=True)
    match = re.search(r'<pre id="result">(.*?)</pre>', result.stdout, re.S)
    assert match, f"Chromium printed no result (exit {result.returncode}): {result.stderr[-2000:]}"
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&")), console
