"""The pyhybrid command line: info, run (lazy kernels), bench (JSON + PNG)."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pyhybrid.bench import harness
from pyhybrid.cli import RUN_COMMANDS, main
from pyhybrid.io import read_events


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


@pytest.mark.parametrize("kernel", sorted(RUN_COMMANDS))
def test_run_refuses_to_replace_an_existing_file_without_overwrite(tmp_path, kernel):
    """An earlier run's file survives a second run with the same -o (it fails before any kernel runs)."""
    earlier = tmp_path / "earlier.h5"
    earlier.write_bytes(b"events of an earlier run")
    result = CliRunner().invoke(main, ["run", kernel, "-o", str(earlier)])
    assert result.exit_code == 2 and "exists; pass --overwrite" in result.output, result.output
    assert earlier.read_bytes() == b"events of an earlier run"


def test_run_me_refuses_an_existing_lhe_file_and_overwrite_replaces_files(tmp_path):
    lhe = tmp_path / "earlier.lhe"
    lhe.write_text("earlier")
    options = ["run", "me", "--events", "50", "--points", "2000", "--adapt", "1", "--iterations", "1",
               "-o", str(tmp_path / "new.h5"), "--lhe", str(lhe)]
    result = CliRunner().invoke(main, options)
    assert result.exit_code == 2 and "--lhe" in result.output and "exists" in result.output, result.output
    assert lhe.read_text() == "earlier" and not (tmp_path / "new.h5").exists()
    result = CliRunner().invoke(main, [*options, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert lhe.read_text().startswith("<LesHouchesEvents")
    # --events 0 writes no file, so an existing one is no obstacle
    result = CliRunner().invoke(main, ["run", "me", "--events", "0", "--points", "2000", "--adapt", "1",
                                       "--iterations", "1", "-o", str(tmp_path / "new.h5")])
    assert result.exit_code == 0, result.output


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
    for row in data["rows"]:
        assert row["openmp"] == harness._openmp_setting(harness._environment(row["backend"]))


def test_bench_runs_drjit_with_passive_openmp_unless_the_caller_chose(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert harness._environment("drjit") == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert harness._environment("torch") == {}
    assert harness._openmp_setting(harness._environment("drjit")) == "OMP_WAIT_POLICY=PASSIVE"
    assert harness._openmp_setting(harness._environment("torch")) == "default"
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")  # libgomp's default, made explicit
    assert harness._environment("drjit") == {}
    assert harness._openmp_setting(harness._environment("drjit")) == "GOMP_SPINCOUNT=300000"


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


@pytest.mark.parametrize("command", ["propagate", "shower", "calorimeter"])
def test_batched_runs_take_the_batch_size_under_one_name(command):
    """--batch-size in every batched run (--batch: the same option)."""
    result = CliRunner().invoke(main, ["run", command, "--help"])
    assert result.exit_code == 0 and "--batch-size, --batch" in result.output, result.output


def test_gradient_ratios_alternate_the_calls_and_report_each_against_the_forward(capsys):
    import torch

    from pyhybrid.bench import ratios

    order = []
    times = ratios.alternate({"forward": lambda: order.append("f"), "grad": lambda: order.append("g")}, rounds=3,
                             warmup=1)
    assert order == ["f", "g"] * 4 and {name: len(t) for name, t in times.items()} == {"forward": 3, "grad": 3}
    # Ratios within each round: 2, 3, 4 -> median 3 (the ratio of the median times would be 2.5).
    lines = ratios.report("t", {"forward": [1.0, 2.0, 1.0], "grad": [2.0, 6.0, 4.0]}).splitlines()
    assert lines[2].split()[-3:] == ["3.00x", "forward", "[2.00-4.00]"]
    # The data-movement floor: (read + read+write) / read per round, 3 and 2 -> median 2.5.
    lines = ratios.report("t", {"forward": [1.0, 1.0], "floor: read": [1.0, 2.0],
                                "floor: read+write": [2.0, 2.0]}).splitlines()
    assert lines[-1].split()[-3:] == ["2.50x", "read", "[2.00-3.00]"]
    floors = ratios.momentum_row_floors(3, 5, "float64")
    rows = floors["floor: read+write"]().torch().reshape(5, 3, 4) / 2.0
    assert rows.abs().sum() > 0
    torch.testing.assert_close(floors["floor: read"]().torch(), rows.sum(dim=(1, 2)), rtol=1e-12, atol=0)
    ratios.main(["--topic", "me", "--size", "64", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if not line.startswith(" ")] == [f"{p}, 64 events" for p in ("ee_mumu", "ee_qqg", "gg_tt")]
    assert sum(line.split()[0] == "forward" and line.endswith("1.00x forward [1.00-1.00]") for line in lines) == 3
    assert sum(line.strip().startswith("(read + read+write) / read") for line in lines) == 3
    with pytest.raises(SystemExit):
        ratios.main(["--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err


def test_ctrl_c_in_a_batch_loop_stops_after_the_batch_and_twice_at_once():
    import os
    import signal
    import time

    from pyhybrid.progress import progress_bar

    before = signal.getsignal(signal.SIGINT)
    with progress_bar(3, "batches") as advance:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler has run: recorded, not raised
        with pytest.raises(KeyboardInterrupt):
            advance(1)
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt), progress_bar(3, "batches"):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_stops_a_run_and_keeps_the_written_events(tmp_path):
    """SIGINT while `run shower` writes batches: it stops within seconds (it used to go on when the
    signal arrived inside a weakref callback), and the file holds whole batches."""
    import signal
    import time

    import h5py

    output = tmp_path / "showers.h5"
    command = [sys.executable, "-m", "pyhybrid.cli", "run", "shower", "--events", "100000000", "--batch", "20000",
               "-o", str(output)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (output.exists() and output.stat().st_size > 2**20) and time.monotonic() < deadline:
            time.sleep(0.2)  # until the first batch is on disk
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 1 and "Aborted!" in out, out
    with h5py.File(output, "r") as f:
        n_events = int(f["n_events"][0])
    assert n_events > 0 and n_events % 20000 == 0
    assert read_events(output).complete is False
