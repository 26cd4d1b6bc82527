"""The pyhybrid command line: info, run (lazy kernels), bench (JSON + PNG)."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pyhybrid.bench import harness
from pyhybrid.cli import RUN_COMMANDS, main


def test_info_reports_versions_and_backends():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    for key in ("drjit", "libLLVM (cpu backend)", "CUDA (cuda backend)", "cpu threads (Dr.Jit)", "torch"):
        assert key in result.output


def test_every_run_kernel_has_a_command():
    runner = CliRunner()
    for name in RUN_COMMANDS:
        result = runner.invoke(main, ["run", name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        for option in ("--device", "--seed", "--output"):
            assert option in result.output, (name, option)


def test_run_commands_do_not_import_torch():
    code = ("import sys, importlib\n"
            f"for name in {sorted(RUN_COMMANDS)!r}:\n"
            "    importlib.import_module('pyhybrid.commands.' + name)\n"
            "assert 'torch' not in sys.modules, 'a standalone run command imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_writes_json_and_png(tmp_path):
    name = "propagate-rk4-forward"  # a cheap case with a torch-eager baseline
    assert name in harness.load_cases()
    result = CliRunner().invoke(main, ["bench", "--case", name, "--repeats", "1", "--threads", "1",
                                       "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    backends = {row["backend"] for row in data["rows"]}
    assert backends == {"drjit", "torch"}
    assert all(row["ratio_vs_torch"] > 0 for row in data["rows"])
    assert all(row["rate"] > 0 and row["peak_rss_mb"] > 0 for row in data["rows"])
    if sys.platform == "linux":  # the calls' own peak, counted from the end of the set-up
        assert all(0 <= row["calls_rss_mb"] <= row["peak_rss_mb"] for row in data["rows"])
    assert (tmp_path / "bench.png").stat().st_size > 1000


@pytest.mark.skipif(sys.platform != "linux", reason="counts the peak from /proc/self")
def test_bench_memory_counts_the_peak_of_the_calls_only():
    before = bytearray(200 * 2**20)
    before[::4096] = b"x" * len(before[::4096])  # touched: resident
    del before  # a peak of >= 200 MB before the set-up ends, not the calls'
    set_up_rss, reset = harness._status_mb("VmRSS"), harness._reset_peak_rss()
    assert reset
    calls = bytearray(100 * 2**20)
    calls[::4096] = b"x" * len(calls[::4096])
    report = harness._memory_report(set_up_rss, reset)
    del calls
    assert 90 <= report["calls_rss_mb"] < 190, report


def test_bench_rejects_unknown_case():
    result = CliRunner().invoke(main, ["bench", "--case", "no-such-case"])
    assert result.exit_code != 0 and "unknown case" in result.output
