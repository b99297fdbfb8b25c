"""The run's ETA comes from what the remaining cells are (model, method, suite), with fake timings."""
import pytest

from qbench.runner import Progress


def cell(method: str, suite: str, model: str = "m") -> dict:
    return {"id": f"{model}|{method}|{suite}", "model": model, "method": {"label": method},
            "suite": {"name": suite, "label": suite}}


def finish(progress: Progress, c: dict, seconds: float) -> None:
    progress.finish(c, {"status": "ok", "duration_s": seconds})


def run_of(methods, suites, models=("m",)):
    return [cell(me, su, mo) for mo in models for me in methods for su in suites]


def test_no_eta_before_the_first_cell(capsys):
    cells = run_of(["fp16"], ["memory", "perplexity"])
    progress = Progress(len(cells), 0, remaining=cells)
    assert progress.eta_s() is None and progress.estimate(cells[0]) is None


def test_eta_uses_each_suites_own_time_not_the_first_cells(capsys):
    # memory is fast (10 s), perplexity slow (300 s): after fp16's two cells, nf4's are estimated per suite
    cells = run_of(["fp16", "nf4"], ["memory", "perplexity"])
    progress = Progress(len(cells), 0, remaining=cells)
    finish(progress, cells[0], 10.0)
    assert progress.eta_s() == pytest.approx(3 * 10.0)  # nothing known about perplexity yet: the only mean
    finish(progress, cells[1], 300.0)
    assert progress.estimate(cells[3]) == pytest.approx(300.0)
    assert progress.eta_s() == pytest.approx(10.0 + 300.0)
    assert "ETA 5.2 min" in capsys.readouterr().out  # (10 + 300) / 60


def test_a_slower_method_scales_its_remaining_cells(capsys):
    cells = run_of(["fp16", "gptq"], ["memory", "latency", "perplexity"])
    progress = Progress(len(cells), 0, remaining=cells)
    for c, s in zip(cells[:3], (10.0, 60.0, 300.0)):
        finish(progress, c, s)
    finish(progress, cells[3], 40.0)  # gptq's memory cell took 4x fp16's (it quantized)
    assert progress.estimate(cells[4]) == pytest.approx(4 * 60.0)
    assert progress.eta_s() == pytest.approx(4 * 60.0 + 4 * 300.0)


def test_an_unseen_model_falls_back_to_the_suite_then_everything(capsys):
    cells = run_of(["fp16"], ["memory", "latency"], models=("small", "big"))
    progress = Progress(len(cells), 0, remaining=cells)
    finish(progress, cells[0], 10.0)
    finish(progress, cells[1], 50.0)
    big_memory, big_latency = cells[2], cells[3]
    assert progress.estimate(big_memory) == pytest.approx(10.0)  # same suite on another model
    finish(progress, big_memory, 100.0)
    # latency's mean on the other model, times how much slower the big model's memory cell was than memory's mean
    assert progress.estimate(big_latency) == pytest.approx(50.0 * 100.0 / 55.0)


def test_resumed_run_counts_only_the_cells_left(capsys):
    cells = run_of(["fp16", "nf4"], ["memory"])
    progress = Progress(len(cells), 1, remaining=cells[1:])  # fp16 × memory recorded by an earlier run
    finish(progress, cells[1], 12.0)
    assert progress.eta_s() == 0 and "ETA" not in capsys.readouterr().out


def test_a_cells_warnings_are_printed_under_its_line(capsys):
    cells = run_of(["fp16"], ["latency"])
    progress = Progress(1, 0, remaining=cells)
    progress.finish(cells[0], {"status": "ok", "duration_s": 3.0,
                               "extra": {"warnings": ["latency timings are noisy: others used 1.9 of 2 cores"]}})
    out = capsys.readouterr().out
    assert out.endswith("(3.0 s)\n    warning: latency timings are noisy: others used 1.9 of 2 cores\n")
