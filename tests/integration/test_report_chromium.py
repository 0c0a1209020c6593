"""The HTML report opened in headless Chromium: no errors, every plot decoded, nothing fetched.

A copy of the report gets a strict Content-Security-Policy (data: images and inline styles only:
any network fetch is refused and logged) and a probe script that writes what it sees into the
DOM, which ``--dump-dom`` prints.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from analysis import synthetic
from analysis.plots import PLOTS
from analysis.report import write_report
from conftest import need_binary  # tests/ is on sys.path (rootdir conftest)

CSP = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
       "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">")
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
document.addEventListener('securitypolicyviolation', e => window.__errors.push('csp ' + e.blockedURI));
window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('figure[data-plot] img')];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const out = document.createElement('div');
  out.id = 'probe';
  out.setAttribute('data-imgs', imgs.length);
  out.setAttribute('data-decoded', ok);
  out.setAttribute('data-errors', window.__errors.join('|'));
  document.body.appendChild(out);
});
</script>"""


def _open(chromium: str, page, tmp_path) -> tuple[str, str]:
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


@pytest.mark.chromium
def test_report_renders_in_chromium(tmp_path):
    chromium = need_binary("chromium")
    run_dir = synthetic.write(tmp_path / "run")
    html = write_report(run_dir).read_text()
    expected = int(re.search(r'data-plots="(\d+)"', html).group(1))
    assert expected == len(PLOTS)  # a synthetic run has data for every plot
    page = tmp_path / "probe.html"
    page.write_text(html.replace("<head>", "<head>" + CSP, 1).replace("</body>", PROBE + "</body>", 1))
    dom, log = _open(chromium, page, tmp_path)
    probe = re.search(r'<div id="probe" data-imgs="(\d+)" data-decoded="(\d+)" data-errors="([^"]*)"', dom)
    assert probe, f"the probe did not run; DOM tail: {dom[-500:]}"
    imgs, decoded, errors = int(probe.group(1)), int(probe.group(2)), probe.group(3)
    assert (imgs, decoded) == (expected, expected)
    assert errors == ""
    console_errors = [x for x in log.splitlines() if "CONSOLE" in x and ("rror" in x or "Refused" in x)]
    assert not console_errors, console_errors
    assert "<h2>Verdict</h2>" in dom


@pytest.mark.chromium
def test_probe_catches_a_broken_plot(tmp_path):
    """The check above can fail: a corrupt image is counted as not decoded."""
    chromium = need_binary("chromium")
    html = ('<html><head></head><body><figure data-plot="x"><img src="data:image/png;base64,AAAA">'
            '</figure></body></html>')
    page = tmp_path / "broken.html"
    page.write_text(html.replace("<head>", "<head>" + CSP, 1).replace("</body>", PROBE + "</body>", 1))
    dom, _log = _open(chromium, page, tmp_path)
    assert re.search(r'data-imgs="1" data-decoded="0"', dom)


@pytest.mark.chromium
def test_probe_catches_a_network_fetch(tmp_path):
    """…and a resource fetched over the network is refused and reported."""
    chromium = need_binary("chromium")
    html = '<html><head></head><body><img src="http://127.0.0.1:9/x.png"></body></html>'
    page = tmp_path / "net.html"
    page.write_text(html.replace("<head>", "<head>" + CSP, 1).replace("</body>", PROBE + "</body>", 1))
    dom, _log = _open(chromium, page, tmp_path)
    assert re.search(r'data-errors="csp http://127.0.0.1:9/x.png', dom)
