"""The plugin host: documented hooks, built-ins and third-party plugins loaded the same way."""
import importlib
import inspect

import pytest

from qbench import hookspecs, host
from tests.helpers import make_third_party_dist


def test_every_hook_is_documented():
    hooks = [obj for name, obj in vars(hookspecs).items()
             if callable(obj) and hasattr(obj, "qbench_spec")]
    assert {h.__name__ for h in hooks} >= {"register_methods", "register_suites", "register_executors"}
    for hook in hooks:
        doc = inspect.getdoc(hook) or ""
        assert len(doc) > 40, f"hook {hook.__name__} needs a docstring saying what to register"


@pytest.fixture
def fresh_host(monkeypatch):
    host.reset()
    yield host
    host.reset()


def test_builtins_load_as_plugins(fresh_host):
    assert {"fp16", "bf16", "fp32"} <= set(fresh_host.methods())
    assert {"memory", "latency", "perplexity"} <= set(fresh_host.suites())
    assert fresh_host.provided_by("methods")["fp16"] == "qbench.plugins.baseline"


def test_load_plugins_env_restricts(fresh_host, monkeypatch):
    monkeypatch.setenv("QBENCH_LOAD_PLUGINS", "baseline,memory")
    assert set(fresh_host.suites()) == {"memory"}
    assert "fp16" in fresh_host.methods()


def test_entry_point_plugin_is_discovered(fresh_host, tmp_path, monkeypatch):
    make_third_party_dist(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert "sign" in fresh_host.methods()
    row = [r for r in fresh_host.plugin_status() if r["name"] == "sign"][0]
    assert row["status"] == "ok" and "qbench-sign-method" in row["source"]


def test_broken_plugin_is_reported_and_others_still_load(fresh_host, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "qbench_broken.py").write_text("import this_module_does_not_exist\n")
    info = site / "qbench_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qbench-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[qbench]\nbroken = qbench_broken\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert "fp16" in fresh_host.methods()
    rows = {r["name"]: r for r in fresh_host.plugin_status()}
    assert rows["broken"]["status"] == "failed"
    assert "this_module_does_not_exist" in rows["broken"]["error"]


def test_register_plugin_in_process(fresh_host):
    class Plugin:
        @staticmethod
        @__import__("qbench").hookimpl
        def register_suites(register):
            from qbench.suite import Metric, Suite

            class Answer(Suite):
                name = "answer"

                def measure(self, ctx):
                    return {"answer": Metric(42, "")}

            register(Answer)

    fresh_host.register_plugin(Plugin, name="answer-plugin")
    assert "answer" in fresh_host.suites()
