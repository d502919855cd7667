"""The benchmarks run, agree with their reference implementation, and keep RESULTS.md tidy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import aggregation, common

pytest.importorskip("flwr")


def test_quick_aggregation_benchmark_writes_agreeing_results(tmp_path: Path) -> None:
    results_md = tmp_path / "RESULTS.md"
    other = "<!-- benchmark:other -->\n## Other\n\nkept\n<!-- /benchmark:other -->\n"
    results_md.write_text(common.RESULTS_MD_HEADER + "\n" + other)
    code = aggregation.main(
        ["--quick", "--repeats", "1", "--out-dir", str(tmp_path), "--results-md", str(results_md)]
    )
    assert code == 0

    payload = json.loads((tmp_path / "aggregation.json").read_text())
    assert {"benchmark", "created_utc", "quick", "machine", "config", "fedavg", "krum"} <= set(
        payload
    )
    assert payload["benchmark"] == "aggregation" and payload["quick"] is True
    assert payload["agree"] is True
    assert {"cpu", "cores", "ram_gib", "python", "packages"} <= set(payload["machine"])
    assert {"numpy", "torch", "flwr"} <= set(payload["machine"]["packages"])

    timing_keys = {"fedcoord_s", "flwr_s", "fedcoord_gb_s", "flwr_gb_s", "speedup", "agree"}
    assert [row["model"] for row in payload["fedavg"]] == ["1 tensor", "161 tensors"]
    for row in payload["fedavg"]:
        assert timing_keys <= set(row)
        assert row["agree"] is True
        assert row["fedcoord_dtype"] == "float32" and row["flwr_dtype"] == "float32"
        assert row["fedcoord_s"] > 0 and row["flwr_s"] > 0
        assert row["fedcoord_max_err_vs_float64"] < 1e-5
    krum = payload["krum"]
    assert timing_keys <= set(krum)
    assert krum["agree"] is True
    assert krum["fedcoord_pick"] == krum["flwr_pick"] == krum["expected_pick"]

    section = common.read_section("aggregation", results_md)
    assert section is not None and "| FedAvg | 1 tensor |" in section and "Machine:" in section
    text = results_md.read_text()
    assert text.startswith(common.RESULTS_MD_HEADER + "\n" + other)  # others kept as they were
    assert text.index("<!-- benchmark:other -->") < text.index("<!-- benchmark:aggregation -->")


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    common.write_section("a", "## A\n\nfirst", path)
    common.write_section("b", "## B\n\nsecond", path)
    before_b = path.read_text().split("<!-- benchmark:b -->")[1]
    common.write_section("a", "## A\n\nrewritten", path)
    text = path.read_text()
    assert common.read_section("a", path) == "## A\n\nrewritten"
    assert common.read_section("b", path) == "## B\n\nsecond"
    assert text.split("<!-- benchmark:b -->")[1] == before_b
    assert text.count("<!-- benchmark:a -->") == 1 and "first" not in text
    assert text.startswith(common.RESULTS_MD_HEADER)


def test_best_of_returns_the_last_result_and_every_run() -> None:
    calls: list[int] = []

    def work() -> int:
        calls.append(1)
        return len(calls)

    timing, result = common.best_of(work, repeats=3, warmup=2)
    assert len(calls) == 5 and result == 5
    assert len(timing.runs) == 3 and timing.best == min(timing.runs) <= timing.median


def test_layouts_cover_the_parameters_exactly() -> None:
    for d in (1, 3, 4, 161, 100_000, 10_000_000):
        layout = aggregation.layered(d)
        assert layout.size == d
        flat = np.arange(d, dtype=np.float32)
        model = layout.model(flat)
        assert np.array_equal(np.concatenate([a.ravel() for a in model.values()]), flat)
    assert aggregation.layered(10_000_000).label == "161 tensors"


def test_quick_secagg_benchmark_runs_both_modes_and_writes_results(tmp_path: Path) -> None:
    from benchmarks import secagg

    results_md = tmp_path / "RESULTS.md"
    code = secagg.main(
        ["--quick", "--rounds", "2", "--out-dir", str(tmp_path), "--results-md", str(results_md)]
    )
    assert code == 0
    payload = json.loads((tmp_path / "secagg.json").read_text())
    assert payload["benchmark"] == "secagg" and payload["quick"] is True
    (row,) = payload["rows"]
    assert (row["sites"], row["params"], row["workload"]) == (10, 100_000, "fixed")
    assert row["fedcoord_runs"]["plain"]["mode"] == "off"
    assert row["fedcoord_runs"]["secagg"]["mode"] in ("secagg", "secagg+")
    assert row["fedcoord_plain_s"] > 0 and row["fedcoord_secagg_s"] > 0
    assert row["coordinator_cpu_secagg_s"] > 0
    assert payload["kernels"]["shamir_100x100_ms"] > 0
    section = common.read_section("secagg", results_md)
    assert section is not None and "| fixed | 10 | 100,000 |" in section


def test_quick_round_latency_benchmark_moves_the_model_both_ways(tmp_path: Path) -> None:
    from benchmarks import round_latency

    results_md = tmp_path / "RESULTS.md"
    code = round_latency.main(
        ["--quick", "--rounds", "2", "--out-dir", str(tmp_path), "--results-md", str(results_md)]
    )
    assert code == 0
    payload = json.loads((tmp_path / "round_latency.json").read_text())
    assert payload["benchmark"] == "round_latency" and payload["quick"] is True
    assert {"cores", "ram_gib"} <= set(payload["machine"])
    (cell,) = payload["cells"]
    assert (cell["sites"], cell["params"], cell["rounds"]) == (4, 10_000, 2)
    assert cell["bytes_down"] == cell["bytes_up"] == 4 * 10_000 * 4
    assert cell["round_s"] > 0 and cell["mb_s"] > 0 and cell["collect_s"] <= cell["round_s"]
    single = payload["single"]
    assert (single["sites"], single["params"]) == (1, 100_000) and single["collect_mb_s"] > 0
    streams = single["rounds"] - 1  # every round after the first: one stream each way
    assert len(single["download_mb_s_all"]) == len(single["upload_mb_s_all"]) == streams
    section = common.read_section("round_latency", results_md)
    assert section is not None and "| 4 | 10,000 |" in section and "Single transfer" in section


def test_round_latency_skips_cells_over_the_memory_budget() -> None:
    from benchmarks import round_latency

    budget = 14 * 2**30  # the default --memory-budget-gib
    assert round_latency.needed_bytes(100, 100_000_000) > 100 * 2**30
    assert round_latency.needed_bytes(50, 100_000_000) > budget
    assert round_latency.needed_bytes(10, 100_000_000) <= budget
    assert round_latency.needed_bytes(100, 10_000_000) <= budget
    result = {"cells": [], "skipped": [{"sites": 100, "params": 100_000_000, "needed_bytes": 1}]}
    assert round_latency.table_rows(result)[0][2] == "skipped"
    assert "100 x 100,000,000" in round_latency.skipped_note(result)


def test_quick_fan_in_benchmark_holds_every_poll_and_answers_requests(tmp_path: Path) -> None:
    from benchmarks import fan_in

    results_md = tmp_path / "RESULTS.md"
    code = fan_in.main(["--quick", "--out-dir", str(tmp_path), "--results-md", str(results_md)])
    assert code == 0
    payload = json.loads((tmp_path / "fan_in.json").read_text())
    (row,) = payload["rows"]
    assert row["sites"] == 20 and row["online"] == 20 and row["server_threads"] >= 20
    for kind in ("heartbeat", "empty_poll"):
        assert row[kind]["requests"] > 0 and row[kind]["per_s"] > 0
        assert row[kind]["errors"] == {}
        assert row[kind]["coordinator_cpu_us_per_request"] > 0
    assert row["rss_bytes"] > 0 and row["poll_errors"] == 0
    section = common.read_section("fan_in", results_md)
    assert section is not None and "| 20 |" in section


def test_quick_flower_simulation_benchmark_trains_on_both_sides(tmp_path: Path) -> None:
    from benchmarks import flower_simulation

    results_md = tmp_path / "RESULTS.md"
    code = flower_simulation.main(
        ["--quick", "--out-dir", str(tmp_path), "--results-md", str(results_md)]
    )
    assert code == 0
    payload = json.loads((tmp_path / "flower_simulation.json").read_text())
    ours = payload["fedcoord"]
    assert ours["participants"] == [5, 5] and 0.0 < ours["accuracy"] <= 1.0
    (flower,) = payload["flower"]
    assert flower["error"] is None and flower["engine"] == "flwr in-process"
    assert len(flower["round_s"]) == 2 and 0.0 < flower["accuracy"] <= 1.0
    section = common.read_section("flower_simulation", results_md)
    assert section is not None and "| fedcoord simulate | 5 x 2 |" in section
