"""The backprop viewer's page in a real headless Chromium, driven by Selenium.

Needs Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them) and
the ``selenium`` package (in the ``test`` extra); without them these tests skip, saying so.
"""

from __future__ import annotations

import re
import shutil
import tempfile

import numpy as np
import pytest

import tinymeta as tm
from tinymeta.autograd import graph as _graph

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf)")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium (pip install -e '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "needs Chromium and ChromeDriver (Debian: apt-get install chromium chromium-driver)"
        )
    profile = tempfile.mkdtemp(prefix="tinymeta-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def two_layer_net():
    rng = np.random.default_rng(1)
    x = tm.tensor(rng.standard_normal((4, 3)))
    x.name = "x"
    params = {
        "W1": tm.tensor(0.5 * rng.standard_normal((3, 5)), requires_grad=True),
        "b1": tm.tensor(0.1 * rng.standard_normal(5), requires_grad=True),
        "W2": tm.tensor(0.5 * rng.standard_normal((5, 1)), requires_grad=True),
    }
    loss = ((tm.tanh(x @ params["W1"] + params["b1"]) @ params["W2"]) ** 2).mean()
    loss.name = "loss"
    return loss, params


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page of a small network, its data, and the graph's tensors by node id."""
    loss, params = two_layer_net()
    path = tmp_path_factory.mktemp("viewer") / "backprop.html"
    tm.viz.html(loss, path, params=params)
    data = tm.viz.viewer_data(loss, params=params)
    nodes = _graph.functions(loss)
    numbers = _graph.number_tensors(nodes, [loss])
    by_key = {}
    for fn in nodes:
        for t in [*fn.inputs, *_graph.output_tensors(fn)]:
            by_key[f"t{numbers[id(t)]}"] = t
    return path, data, loss, params, by_key


def _open(browser, path):
    browser.get(path.as_uri())
    browser.get_log("browser")  # start each test with an empty log


def _by_id(browser, element_id):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id)


def _rows(browser, table_id) -> list[tuple[str, list[float], str]]:
    """(name, numbers shown, text) for each row of one of the panel's tables."""
    from selenium.webdriver.common.by import By

    out = []
    for tr in _by_id(browser, table_id).find_elements(By.TAG_NAME, "tr"):
        name = tr.find_element(By.CSS_SELECTOR, "td.name").text
        text = tr.find_element(By.CSS_SELECTOR, ".vals").text
        out.append((name, [float(v) for v in NUMBER.findall(text)], text))
    return out


def _assert_shown(numbers: list[float], text: str, expected: np.ndarray) -> None:
    if text.startswith("norm "):
        np.testing.assert_allclose(numbers, [np.linalg.norm(expected)], rtol=1e-5)
    else:
        np.testing.assert_allclose(numbers, expected.ravel(), rtol=1e-5, atol=1e-12)


def test_page_loads_without_console_errors(browser, page):
    path, data, *_ = page
    _open(browser, path)
    assert _by_id(browser, "tm-step-counter").text == f"step 0 / {len(data['steps'])}"
    assert browser.execute_script("return document.querySelectorAll('#tm-graph .node').length") == (
        len(data["nodes"])
    )
    browser.execute_script("console.error('a planted error')")  # the log is really read
    planted = browser.get_log("browser")
    assert any("a planted error" in e["message"] for e in planted)
    _open(browser, path)
    browser.refresh()
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []


def test_step_control_walks_every_step(browser, page):
    from selenium.webdriver.common.keys import Keys

    path, data, *_ = page
    _open(browser, path)
    n = len(data["steps"])
    current = "return [...document.querySelectorAll('.node.current')].map(e => e.dataset.node)"
    assert browser.execute_script(current) == []
    seen = []
    for k in range(1, n + 1):
        _by_id(browser, "tm-next").click()
        assert _by_id(browser, "tm-step-counter").text == f"step {k} / {n}"
        highlighted = browser.execute_script(current)
        assert highlighted == [data["steps"][k - 1]["node"]]
        assert _by_id(browser, "tm-op").text == f"Step {k}: {data['steps'][k - 1]['op']}"
        assert _by_id(browser, "tm-formula").text == data["steps"][k - 1]["formula"]
        seen.append(highlighted[0])
    assert len(set(seen)) == n  # a different op at every step
    assert not _by_id(browser, "tm-next").is_enabled()
    # The last step shows every leaf filled, in the graph and in the panel.
    leaves = [leaf["tensor"] for leaf in data["leaves"]]
    filled = browser.execute_script(
        "return [...document.querySelectorAll('.node.tensor.filled')].map(e => e.dataset.node)"
    )
    assert sorted(filled) == sorted(leaves)
    assert all(text != "-" for _, _, text in _rows(browser, "tm-leaves"))
    # Keys: back one step, then to the start, where no leaf has a gradient yet.
    body = browser.find_element("tag name", "body")
    body.send_keys(Keys.ARROW_LEFT)
    assert _by_id(browser, "tm-step-counter").text == f"step {n - 1} / {n}"
    body.send_keys(Keys.HOME)
    assert _by_id(browser, "tm-step-counter").text == f"step 0 / {n}"
    assert all(text == "-" for _, _, text in _rows(browser, "tm-leaves"))


def test_values_shown_equal_the_engines(browser, page):
    path, data, loss, params, by_key = page
    _open(browser, path)
    names = {id(t): name for name, t in params.items()}
    checked = 0
    for step in data["steps"]:
        _by_id(browser, "tm-next").click()
        gy_rows = _rows(browser, "tm-gy")
        assert [r[0] for r in gy_rows] == [g["label"] for g in step["gy"]]
        for (_, numbers, text), gy in zip(gy_rows, step["gy"]):
            (expected,) = tm.grad(loss, by_key[gy["tensor"]], retain_graph=True)
            _assert_shown(numbers, text, expected.numpy())
            checked += 1
        for (name, numbers, text), gx in zip(_rows(browser, "tm-gx"), step["gx"]):
            x = by_key[gx["tensor"]]
            assert name == (names.get(id(x)) or x.name or gx["tensor"])
            if not gx["needed"]:
                assert text.startswith("not needed")
                continue
            # This op's share of d loss / d x: its rule applied to the engine's gy.
            fn = by_key[step["gy"][0]["tensor"]].grad_fn
            (gy,) = tm.grad(loss, by_key[step["gy"][0]["tensor"]], retain_graph=True)
            (share,) = tm.grad(fn.outputs[0](), x, grad_outputs=gy, retain_graph=True)
            _assert_shown(numbers, text, share.numpy())
            checked += 1
    loss.backward()
    rows = {name: (numbers, text) for name, numbers, text in _rows(browser, "tm-leaves")}
    assert set(rows) == set(params)
    for name, p in params.items():
        _assert_shown(*rows[name], p.grad.numpy())
    assert checked >= 2 * len(data["steps"])
    for p in params.values():
        p.grad = None


def test_create_graph_page_reveals_backward_ops(browser, tmp_path):
    loss, params = two_layer_net()
    path = tm.viz.html(loss, tmp_path / "double.html", params=params, create_graph=True)
    data = tm.viz.viewer_data(loss, params=params, create_graph=True)
    _open(browser, path)
    visible = (
        "return [...document.querySelectorAll('.node.backward-op')]"
        ".filter(e => getComputedStyle(e).display !== 'none').length"
    )
    assert browser.execute_script(visible) == 0
    counts = []
    for _ in data["steps"]:
        _by_id(browser, "tm-next").click()
        counts.append(browser.execute_script(visible))
    expected = np.cumsum([len(s["new_ops"]) for s in data["steps"]]).tolist()
    assert counts == expected and counts[-1] == sum(
        n["role"] == "backward-op" for n in data["nodes"]
    )
    fill = browser.execute_script(
        "return getComputedStyle(document.querySelector('.node.backward-op ellipse')).fill"
    )
    assert fill == "rgb(255, 160, 122)"  # their own colour (lightsalmon, as in to_dot)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
