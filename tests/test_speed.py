"""``orthoptim speed``: the step benchmark runs every contender and reports consistent figures
(tiny shapes: this checks the mechanics, never a speed)."""

import json

import pytest
import torch
from torch import nn

from orthoptim import cli
from orthoptim.benchmarks import speed


def tiny_cnn_case():
    """A user model by import path (``test_speed:tiny_cnn_case``): (model, inputs, targets)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 8))
    model.head = nn.Linear(8, 3)
    return model, torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))


def test_speed_command_times_every_contender_and_writes_json(tmp_path, capsys):
    out = tmp_path / "speed.json"
    args = ["speed", "--shapes", "tiny", "--rounds", "2", "--steps", "1", "--warmup", "1",
            "--quiet", "--json", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = res["optimizers"]
    assert list(rows) == [c.name for c in speed.CONTENDERS]
    for name, row in rows.items():
        assert name in text and "error" not in row, row
        assert 0 < row["step_min_s"] <= row["step_median_s"] <= row["step_max_s"]
        assert row["total_s"] == pytest.approx(row["vs_adamw"] * rows["adamw"]["total_s"])
    assert rows["adamw"]["vs_adamw"] == 1.0
    # AdamW keeps two moments (plus 4-byte step counters); FOGO without memory two momenta on
    # matrices and two moments elsewhere; the memory and K-FAC's factors add to that.
    assert 2.0 <= rows["adamw"]["state_bytes_per_param_byte"] < 2.01
    assert 1.0 < rows["fogo-single-nomem"]["state_bytes_per_param_byte"] < 2.0
    assert 2.0 <= rows["fogo-nomem"]["state_bytes_per_param_byte"] < 2.01
    state = {name: row["state_bytes_per_param_byte"] for name, row in rows.items()}
    assert state["fogo"] > state["fogo-nomem"] and state["kfac"] > state["adamw"]
    for name, period in (("fogo", 50), ("kfac", 10), ("fop", 10)):
        row = rows[name]
        assert row["event_period"] == period
        expect = row["step_median_s"] + (row["event_step_median_s"] - row["step_median_s"]) / period
        assert row["amortised_step_s"] == pytest.approx(expect)
    assert "backward_share_s" in rows["fop"] and "backward_share_s" not in rows["fogo"]
    ns = res["newton_schulz"]["float32"]
    assert ns["matrices"] == 8 and ns["flops"] == sum(
        speed._ns_flops(s) for s in [(96, 32)] * 2 + [(32, 32)] * 2 + [(128, 32)] * 2
        + [(32, 128)] * 2
    )  # fmt: skip
    assert res["ns_dtype_auto"] == "float32" and "GFLOP/s" in text


def test_ns_flop_count_is_five_quintic_iterations():
    m, n = 3, 7  # X X^T (2 m^2 n), A A (2 m^3), B X (2 m^2 n) per iteration, m <= n
    assert speed._ns_flops((n, m)) == speed._ns_flops((m, n)) == 5 * (4 * m * m * n + 2 * m**3)


def test_user_model_by_import_path_and_a_contender_that_cannot_run(capsys):
    args = ["speed", "--shapes", "test_speed:tiny_cnn_case", "--rounds", "1", "--steps", "1",
            "--warmup", "1", "--quiet", "-o", "adamw", "-o", "muon", "-o", "muon-fp32"]  # fmt: skip
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "muon               n/a: NotImplementedError: torch.optim.Muon takes 2-D" in text
    assert "muon-fp32" in text and "x muon32" in text


def test_bad_speed_arguments_name_the_problem(capsys):
    assert cli.main(["speed", "--shapes", "nope"]) == 2
    assert "Invalid shapes: 'nope'" in capsys.readouterr().err
    assert cli.main(["speed", "--shapes", "tiny", "-o", "sgd"]) == 2
    assert "Invalid contender(s) ['sgd']" in capsys.readouterr().err
    assert cli.main(["speed", "--rounds", "0"]) == 2
    assert "--rounds: expected an integer >= 1" in capsys.readouterr().err


def test_cpu_clock_times_the_process_and_refuses_an_accelerator(capsys):
    args = ["speed", "--shapes", "tiny", "--rounds", "1", "--steps", "1", "--warmup", "1",
            "--quiet", "-o", "adamw", "-o", "fogo-nomem", "--clock", "cpu"]  # fmt: skip
    assert cli.main(args) == 0
    assert "clock cpu" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Invalid clock: 'cpu' on device meta"):
        speed.run_speed(speed.CASES["tiny"], device="meta", clock="cpu")
    with pytest.raises(ValueError, match="Invalid clock: 'gpu'"):
        speed.run_speed(speed.CASES["tiny"], clock="gpu")


@pytest.mark.slow
def test_speed_compile_runs():
    res = speed.run_speed(speed.CASES["tiny"], rounds=1, steps=1, warmup=1, compile_step=True,
                          contenders=["adamw", "fogo-nomem"])  # fmt: skip
    for row in res["optimizers"].values():
        assert "step_median_s" in row or "error" in row
