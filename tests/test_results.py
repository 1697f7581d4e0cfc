"""results.py: collect results.json of succeeded experiments, mean +- 95% CI over seeds, md/csv/json."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from gpupack import results
from test_report import make_run  # the shared fixture run (tests/ is on sys.path)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "runs" / "demo")


def _row(table: results.ResultsTable, experiment: str, metric: str) -> results.Row:
    (row,) = [r for r in table.rows if r.experiment == experiment and r.metric == metric]
    return row


def test_collect_reads_succeeded_experiments_only(run_dir: Path) -> None:
    # lat-b8 failed and probe-l1 is running: neither is collected, even with a results.json there
    (run_dir / "exp" / "lat-b8").mkdir(parents=True)
    (run_dir / "exp" / "lat-b8" / "results.json").write_text('{"accuracy": 1}')
    rows = results.collect(run_dir)
    assert sorted(r["name"] for r in rows) == ["bridge-sst2-s1", "bridge-sst2-s2", "bridge-sst2-s3", "bridge-trec-s1", "bridge-trec-s2"]
    assert rows[0]["params"] == {"task": "sst2", "seed": 1} and rows[0]["template"] == "bridge-{task}-s{seed}"


def test_unreadable_results_are_reported_not_fatal(run_dir: Path) -> None:
    (run_dir / "exp" / "bridge-sst2-s2" / "results.json").write_text("{not json")
    problems: list[str] = []
    rows = results.collect(run_dir, problems)
    assert len(rows) == 4
    assert len(problems) == 1 and "bridge-sst2-s2: results.json: cannot read it" in problems[0]


def test_mean_and_ci_over_seeds_by_hand(run_dir: Path) -> None:
    table = results.aggregate(results.collect(run_dir))
    assert table.keys == ("task",)
    sst2 = _row(table, "bridge-sst2-s{seed}", "accuracy")
    # 0.80, 0.84, 0.88: mean 0.84, s = 0.04, t(0.975, 2) = 4.3027, CI = 4.3027 * 0.04 / sqrt(3) = 0.09937
    assert sst2.group == {"task": "sst2"} and sst2.stat.n == 3
    assert sst2.stat.mean == pytest.approx(0.84)
    assert sst2.stat.std == pytest.approx(0.04)
    assert sst2.stat.ci95 == pytest.approx(0.09937, abs=1e-5)
    trec = _row(table, "bridge-trec-s{seed}", "accuracy")
    # 0.70, 0.72 (s3 pending): s = 0.01414, t(0.975, 1) = 12.706, CI = 12.706 * 0.01414 / sqrt(2) = 0.12706
    assert (trec.stat.n, trec.stat.mean, trec.stat.ci95) == (2, pytest.approx(0.71), pytest.approx(0.12706, abs=1e-5))
    assert _row(table, "bridge-sst2-s{seed}", "loss.final").stat.mean == pytest.approx(0.16)  # nested, dotted
    # the echoed config and the repeated grid value are not metrics
    assert {r.metric for r in table.rows} == {"accuracy", "loss.final"}


def test_by_overrides_the_grouping(run_dir: Path) -> None:
    table = results.aggregate(results.collect(run_dir), by=["seed"])
    one = _row(table, "bridge-{task}-s1", "accuracy")
    assert one.group == {"seed": 1} and one.stat.n == 2 and one.stat.mean == pytest.approx(0.75)
    with pytest.raises(ValueError, match="--by: no experiment has a grid key tsk"):
        results.aggregate(results.collect(run_dir), by=["tsk"])


def test_single_value_has_no_interval() -> None:
    stat = results.describe([3.0])
    assert (stat.n, stat.mean, stat.std, stat.ci95) == (1, 3.0, None, None)


def _t_mass(x: float, df: int, steps: int = 4000) -> float:
    """P(0 < T < x) for Student's t with `df` degrees of freedom: its density integrated by
    Simpson's rule (the density is smooth; `steps` even), independent of results.t975."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    h = x / steps
    inner = sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, steps))
    return h / 3 * (pdf(0.0) + inner + pdf(x))


def test_t_quantile_is_the_975th_percentile() -> None:
    # t975(df) = x with P(T < x) = 0.975, i.e. a mass of 0.475 between 0 and x; an error of 1e-4
    # in x moves that mass by density(x) * 1e-4, the tolerance below.
    for df in [*range(1, 60), 100, 1000, 10**6]:
        x = results.t975(df)
        density = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
                           - (df + 1) / 2 * math.log1p(x * x / df))
        assert abs(_t_mass(x, df) - 0.475) <= density * 1e-4, df
    assert results.t975(1) == pytest.approx(12.7062, abs=1e-4) and results.t975(10**6) == pytest.approx(1.95996, abs=1e-4)


def test_render_formats(run_dir: Path) -> None:
    table = results.aggregate(results.collect(run_dir))
    md = results.render(table, "md").splitlines()
    assert md[0] == "| experiment          | task | metric     | n | mean ± 95% CI |"
    assert "| bridge-sst2-s{seed} | sst2 | accuracy   | 3 | 0.840 ± 0.099 |" in md  # CI to 2 digits, mean alike
    assert "| bridge-trec-s{seed} | trec | accuracy   | 2 |   0.71 ± 0.13 |" in md
    records = json.loads(results.render(table, "json"))
    assert records[0]["ci95"] == pytest.approx(0.09937, abs=1e-5) and records[0]["task"] == "sst2"
    parsed = list(csv.DictReader(io.StringIO(results.render(table, "csv"))))
    assert len(parsed) == 4 and math.isclose(float(parsed[0]["mean"]), 0.84)
    with pytest.raises(ValueError):
        results.render(table, "xlsx")


def test_no_results_says_so(tmp_path: Path) -> None:
    assert results.render(results.aggregate([]), "md").startswith("no results")
    assert json.loads(results.render(results.aggregate([]), "json")) == []
