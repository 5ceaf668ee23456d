"""The threshold explorer in a real browser: JupyterLab serves a notebook that builds a `ThresholdExplorer`, Debian's
headless Chromium (driven by Playwright) runs it, moves the threshold sliders with the keyboard and by typing into
their readouts, and checks that the displayed `lam*` is what `solve_dual` gives for the new thresholds; with one
safety score, and with two (two threshold sliders and the beta slider).

Needs /usr/bin/chromium (`apt-get install chromium`; .ci/run installs it). Without it this test fails: a skipped
browser test would be an untested one. A screenshot goes to tests/artifacts/explorer_browser.png.
"""
import os, re, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import nbformat
import numpy as np
import pytest
from playwright.sync_api import sync_playwright
from safe_dual.dual import solve_dual

CHROMIUM = Path('/usr/bin/chromium')
ARTIFACTS = Path(__file__).parent / 'artifacts'
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']

# The app: scores made from a seed, so that the test can recompute lam* here. The explorer's slider steps are powers
# of ten, so its readout shows the exact threshold the kernel received.
APP = '''\
import numpy as np
from safe_dual.explore import ThresholdExplorer
rng = np.random.default_rng(0)
rewards = rng.normal(size=(200, 32))
safety = rng.normal(size=(200, 32)) - 0.6 * rewards
ex = ThresholdExplorer(rewards, safety, beta=0.5, thresholds=0.5)
ex'''

def scores():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(200, 32))
    return rewards, rng.normal(size=(200, 32)) - 0.6 * rewards

APP2 = '''\
import numpy as np
from safe_dual.explore import ThresholdExplorer
rng = np.random.default_rng(1)
rewards = rng.normal(size=(200, 32))
safety = rng.normal(size=(200, 32, 2)) - 0.6 * rewards[..., None]
ex = ThresholdExplorer(rewards, safety, beta=0.5, thresholds=[0.5, 0.3])
ex'''

def scores2():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(200, 32))
    return rewards, rng.normal(size=(200, 32, 2)) - 0.6 * rewards[..., None]

def lams_shown(page):
    "The multipliers the explorer displays (`lam* = 0.1` or `lam* = (0.1, 0.2)`)."
    text = page.inner_text('.sd-lam').strip()
    found = re.fullmatch(r'lam\* = \(?([-+0-9.e, ]+)\)?', text)
    assert found, f'unexpected lam* label {text!r}'
    return np.array([float(v) for v in found.group(1).split(',')])

def type_into(page, readout, text):
    "Type a value into a slider's readout, as a user would."
    readout.click()
    page.keyboard.press('Control+A')
    page.keyboard.type(text)
    page.keyboard.press('Enter')

def wait_until_shown(page, want, timeout=60):
    "Wait until the displayed lam* equals `want` to its 6 significant digits; return what is shown."
    deadline = time.monotonic() + timeout
    while True:
        shown = lams_shown(page)
        if shown.shape == want.shape and np.allclose(shown, want, rtol=1e-5, atol=1e-9): return shown
        assert time.monotonic() < deadline, f'lam* shown {shown}, solve_dual gives {want}'
        time.sleep(0.1)

def lam_shown(page):
    "The multiplier the explorer displays (`lam* = 0.123456`)."
    text = page.inner_text('.sd-lam')
    found = re.fullmatch(r'lam\* = ([-+0-9.e]+)', text.strip())
    assert found, f'unexpected lam* label {text!r}'
    return float(found.group(1))

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

@pytest.fixture
def jupyterlab(tmp_path, request):
    "A JupyterLab server on 127.0.0.1 serving tmp_path/app.ipynb (APP, or the app in `param`), apart from the user's Jupyter settings."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(getattr(request, 'param', APP))])
    nb.metadata['kernelspec'] = dict(name='python3', display_name='Python 3 (ipykernel)', language='python')
    nbformat.write(nb, tmp_path / 'app.ipynb')
    home, port = tmp_path / 'jupyter', free_port()
    # no news or update toasts over the widgets (and no requests to outside sites)
    settings = home / 'settings' / '@jupyterlab' / 'apputils-extension'
    settings.mkdir(parents=True)
    (settings / 'notification.jupyterlab-settings').write_text(
        '{"fetchNews": "false", "checkForUpdates": false, "doNotDisturbMode": true}')
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(home / 'config'), JUPYTER_DATA_DIR=str(home / 'data'),
               JUPYTER_RUNTIME_DIR=str(home / 'runtime'), JUPYTERLAB_SETTINGS_DIR=str(home / 'settings'),
               JUPYTERLAB_WORKSPACES_DIR=str(home / 'workspaces'), IPYTHONDIR=str(home / 'ipython'), MPLBACKEND='Agg')
    log = open(tmp_path / 'jupyterlab.log', 'w')
    server = subprocess.Popen(
        [sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root', '--ServerApp.ip=127.0.0.1',
         f'--ServerApp.port={port}', '--ServerApp.port_retries=0', '--IdentityProvider.token=', '--ServerApp.password=',
         f'--ServerApp.root_dir={tmp_path}', '--expose-app-in-browser', '--LabApp.news_url=None',
         '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate', '--LabApp.extension_manager=readonly'],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f'JupyterLab exited:\n{(tmp_path / "jupyterlab.log").read_text()[-3000:]}'
            try:
                urllib.request.urlopen(f'http://127.0.0.1:{port}/api/status', timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, 'JupyterLab did not answer within 120 s'
                time.sleep(0.5)
        yield f'http://127.0.0.1:{port}', tmp_path / 'jupyterlab.log'
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the kernel it started
        try: server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()

KERNEL_IDLE = '''() => {
  const nb = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = nb && nb.sessionContext && nb.sessionContext.session && nb.sessionContext.session.kernel;
  return !!kernel && kernel.status === 'idle';
}'''

def test_explorer_in_jupyterlab(jupyterlab):
    assert CHROMIUM.exists(), f'{CHROMIUM} is missing: install Debian chromium (apt-get install chromium)'
    url, log = jupyterlab
    rewards, safety = scores()
    ARTIFACTS.mkdir(exist_ok=True)
    start = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=dict(width=1280, height=1000))
        page.set_default_timeout(120_000)
        try:
            page.goto(f'{url}/lab/tree/app.ipynb?reset')
            page.wait_for_function(KERNEL_IDLE, timeout=180_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            handle = page.locator('.sd-threshold .noUi-handle')
            handle.wait_for()
            page.wait_for_function("document.querySelector('.sd-lam').innerText.startsWith('lam*')")
            before = lam_shown(page)
            assert abs(before - solve_dual(rewards, safety, 0.5, 0.5).lam[0]) <= 1e-5 * max(1, before)
            loaded = time.monotonic() - start

            # drag by keyboard: five steps to the right
            readout = page.locator('.sd-threshold .widget-readout')
            assert float(readout.inner_text()) == 0.5

            type_threshold = lambda text: type_into(page, readout, text)

            def wait_for_lam(b):
                "Wait until the explorer shows solve_dual's lam* for threshold `b`; return that lam*."
                want = solve_dual(rewards, safety, b, 0.5).lam[0]
                page.wait_for_function(f"document.querySelector('.sd-lam').innerText === 'lam* = {want:.6g}'")
                return want

            handle.focus()
            moved = time.monotonic()
            for _ in range(5):
                shown_b = readout.inner_text()
                page.keyboard.press('ArrowRight')
                page.wait_for_function(f"document.querySelector('.sd-threshold .widget-readout').innerText !== '{shown_b}'")
            b = float(readout.inner_text())
            assert b > 0.5
            want = wait_for_lam(b)
            keyboard_s = time.monotonic() - moved
            shown = lam_shown(page)
            assert shown != before and abs(shown - want) <= 1e-5 * max(1, want), (shown, want)

            # type a threshold into the readout
            type_threshold('0.8')
            wait_for_lam(0.8)

            # the plots follow once the slider rests: the caption names the marked threshold
            page.wait_for_function("document.querySelector('.sd-caption').innerText.includes('b = 0.8')")
            page.wait_for_function("document.querySelector('.sd-plot').naturalWidth > 0")
            page.locator('.sd-plot').scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / 'explorer_browser.png'), full_page=True)

            # past the feasible edge: a message, no crash; back inside: numbers again
            type_threshold(f'{safety.max(1).mean() + 0.05:.4f}')
            page.wait_for_function("document.querySelector('.sd-message').innerText.includes('Past the feasible edge')")
            assert 'infeasible' in page.inner_text('.sd-lam')
            type_threshold('0.6')
            wait_for_lam(0.6)
            assert page.inner_text('.sd-message').strip() == ''
        except Exception:
            page.screenshot(path=str(ARTIFACTS / 'explorer_browser_failure.png'), full_page=True)
            print(log.read_text()[-3000:])
            raise
        finally:
            browser.close()
    print(f'browser test: notebook loaded and explorer shown in {loaded:.1f} s; five keyboard steps to updated lam* in '
          f'{keyboard_s * 1000:.0f} ms; total {time.monotonic() - start:.1f} s')


@pytest.mark.parametrize('jupyterlab', [APP2], indirect=True)
def test_explorer_with_two_constraints_in_jupyterlab(jupyterlab):
    "Two threshold sliders and the beta slider: after each move the displayed (lam_1, lam_2) is solve_dual's."
    assert CHROMIUM.exists(), f'{CHROMIUM} is missing: install Debian chromium (apt-get install chromium)'
    url, log = jupyterlab
    rewards, safety = scores2()
    ARTIFACTS.mkdir(exist_ok=True)
    start = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=dict(width=1280, height=1000))
        page.set_default_timeout(120_000)
        try:
            page.goto(f'{url}/lab/tree/app.ipynb?reset')
            page.wait_for_function(KERNEL_IDLE, timeout=180_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.locator('.sd-beta .widget-readout').wait_for()
            page.wait_for_function("document.querySelector('.sd-lam').innerText.startsWith('lam*')")
            readouts = page.locator('.sd-threshold .widget-readout')
            assert readouts.count() == 2 and page.locator('.sd-threshold .noUi-handle').count() == 2
            beta_readout = page.locator('.sd-beta .widget-readout')
            # the beta slider moves log10(beta) in steps of 0.01 from log10(0.5); its readout shows 3 digits, enough
            # to tell which step it is on, and so the exact beta the kernel has
            on_grid = lambda shown: 10 ** (np.log10(0.5) + np.round((np.log10(shown) - np.log10(0.5)) / 0.01) * 0.01)
            state = lambda: ([float(readouts.nth(k).inner_text()) for k in range(2)],
                             on_grid(float(beta_readout.inner_text())))

            def check():
                "The displayed lam* is solve_dual's at the thresholds and beta the readouts show; both constraints bind."
                b, beta = state()
                want = solve_dual(rewards, safety, b, beta).lam
                assert (want > 0).all(), (b, beta, want)
                return wait_until_shown(page, want)

            first = check()
            loaded = time.monotonic() - start
            assert state()[0] == [0.5, 0.3] and abs(state()[1] - 0.5) < 1e-12
            type_into(page, readouts.nth(0), '0.8')
            after_first = check()
            assert state()[0] == [0.8, 0.3] and after_first[0] > first[0]
            type_into(page, readouts.nth(1), '0.6')
            assert state()[0] == [0.8, 0.6]
            check()
            shown_b = readouts.nth(1).inner_text()
            page.locator('.sd-threshold .noUi-handle').nth(1).focus()
            page.keyboard.press('ArrowRight')  # one step of the second slider by keyboard
            page.wait_for_function(f"document.querySelectorAll('.sd-threshold .widget-readout')[1].innerText !== '{shown_b}'")
            check()
            type_into(page, beta_readout, '1')
            page.wait_for_function("document.querySelector('.sd-beta .widget-readout').innerText !== '0.5'")
            assert abs(state()[1] - 1) < 0.01
            at_beta_1 = check()
            assert not np.allclose(at_beta_1, after_first)
            page.wait_for_function("document.querySelector('.sd-caption').innerText.includes('b = 0.8')")
            page.screenshot(path=str(ARTIFACTS / 'explorer_browser_m2.png'), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / 'explorer_browser_m2_failure.png'), full_page=True)
            print(log.read_text()[-3000:])
            raise
        finally:
            browser.close()
    print(f'browser test (m = 2): explorer shown in {loaded:.1f} s; total {time.monotonic() - start:.1f} s')
