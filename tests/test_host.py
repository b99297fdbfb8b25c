"""The plugin host: documented hooks, built-ins and third-party plugins loaded the same way."""
import importlib
import inspect

import pytest

from qbench import hookspecs, host
from tests.helpers import THIRD_PARTY_PLUGIN as THIRD_PARTY_SIGN
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


def make_dist(site, module: str, code: str, dist: str, version: str = "0.1", entry: str | None = None):
    """An installed distribution whose `qbench` entry point is ``module``."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(code)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[qbench]\n{entry or module} = {module}\n")
    return site


@pytest.mark.parametrize("statement, raised", [("import sys; sys.exit(3)", "SystemExit"),
                                               ("raise SystemExit('bye')", "SystemExit"),
                                               ("raise GeneratorExit", "GeneratorExit")])
def test_a_plugin_exiting_at_import_does_not_stop_qbench(fresh_host, tmp_path, monkeypatch, statement, raised):
    make_dist(tmp_path / "site", "qbench_quitter", statement + "\n", "qbench-quitter")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert "fp16" in fresh_host.methods()
    rows = {r["name"]: r for r in fresh_host.plugin_status()}
    assert rows["qbench_quitter"]["status"] == "failed" and raised in rows["qbench_quitter"]["error"]


def test_a_plugin_exiting_in_its_hook_does_not_stop_qbench(fresh_host, tmp_path, monkeypatch):
    code = "import sys\nimport qbench\n\n@qbench.hookimpl\ndef register_methods(register):\n    sys.exit(1)\n"
    make_dist(tmp_path / "site", "qbench_hook_quitter", code, "qbench-hook-quitter")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert "fp16" in fresh_host.methods()
    rows = {r["name"]: r for r in fresh_host.plugin_status()}
    assert rows["qbench_hook_quitter"]["status"] == "failed" and "SystemExit" in rows["qbench_hook_quitter"]["error"]


def test_ctrl_c_while_a_plugin_imports_is_reported_then_stops(fresh_host, tmp_path, monkeypatch, capsys):
    make_dist(tmp_path / "site", "qbench_interrupted", "raise KeyboardInterrupt\n", "qbench-interrupted")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    with pytest.raises(KeyboardInterrupt):
        fresh_host.methods()
    assert "qbench_interrupted" in capsys.readouterr().err


CLASHING = '''
import qbench
from qbench.plugins.baseline import FP16


class Impostor(FP16):
    description = "not the real fp16"


@qbench.hookimpl
def register_methods(register):
    register(Impostor)
'''


def test_a_plugin_cannot_replace_a_builtin_method(fresh_host, tmp_path, monkeypatch, capsys):
    make_dist(tmp_path / "site", "qbench_impostor", CLASHING, "qbench-impostor", "9.9")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert fresh_host.methods()["fp16"].description != "not the real fp16"
    assert fresh_host.provided_by("methods")["fp16"] == "qbench.plugins.baseline"
    rows = {r["name"]: r for r in fresh_host.plugin_status()}
    error = rows["qbench_impostor"]["error"]
    assert "fp16" in error and "qbench-impostor 9.9" in error and "qbench-quant" in error
    assert "qbench-impostor 9.9" in capsys.readouterr().err  # said where the user sees it


def test_two_plugins_with_one_name_are_refused_naming_both(fresh_host, tmp_path, monkeypatch):
    from qbench.params import QBenchError

    site = tmp_path / "site"
    make_third_party_dist(site)  # qbench-sign-method 0.1 registers "sign"
    code = THIRD_PARTY_SIGN.replace("third-party test method", "another sign method")
    make_dist(site, "qbench_other_sign", code, "qbench-other-sign", "2.0")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert "fp16" in fresh_host.methods()
    with pytest.raises(QBenchError) as err:
        fresh_host.make_method("sign", {})
    for needle in ("qbench-sign-method 0.1", "qbench-other-sign 2.0", "uninstall"):
        assert needle in str(err.value)


def test_provenance_of_methods_and_suites(fresh_host, tmp_path, monkeypatch):
    make_third_party_dist(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    from qbench.records import distribution_version

    builtin = {"plugin": "qbench.plugins.baseline", "distribution": "qbench-quant",
               "version": distribution_version("qbench-quant")}
    assert fresh_host.provenance("methods", "fp16") == builtin
    assert fresh_host.provenance("suites", "memory")["distribution"] == "qbench-quant"
    assert fresh_host.provenance("methods", "sign") == {
        "plugin": "sign", "distribution": "qbench-sign-method", "version": "0.1"}
