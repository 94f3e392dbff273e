"""examples/monitor_study.py's summary across seeds: the numbers docs/monitors.md quotes."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("monitor_study", ROOT / "examples/monitor_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(rate, low, warned):
    return {
        "win_rate": rate,
        "ci_low": low,
        "first_warning": {"step": 10, "monitor": "m"} if warned else None,
    }


def test_across_seeds_gives_the_mean_a_t_interval_and_paired_differences():
    study = _study()
    tables = {
        0: {"tuned": _row(0.8, 0.6, False), "x10": _row(0.5, 0.4, True)},
        1: {"tuned": _row(0.6, 0.45, False), "x10": _row(0.4, 0.3, True)},
        2: {"tuned": _row(0.7, 0.55, True), "x10": _row(0.3, 0.2, False)},
    }
    lines = study.across_seeds(tables).splitlines()
    tuned = [c.strip() for c in lines[2].split("|")[1:-1]]
    x10 = [c.strip() for c in lines[3].split("|")[1:-1]]
    # tuned: mean 0.7, sd 0.1, t(0.975, 2) = 4.303: half width 4.303 * 0.1 / sqrt(3) = 0.248
    assert tuned[:4] == ["tuned", "3", "0.70 [0.45, 0.95]", "0.80, 0.60, 0.70"]
    # x10 - tuned per seed: -0.3, -0.2, -0.4: mean -0.3, sd 0.1, the same half width
    assert x10[4] == "-0.30 [-0.55, -0.05]" and tuned[5] == "+0.30 [+0.05, +0.55]"
    assert tuned[6:] == ["2/3", "1/3"] and x10[6:] == ["0/3", "2/3"]
    # a win rate's interval stays in [0, 1]
    assert study._mean_ci([0.9, 1.0, 0.95]).endswith("1.00]")
