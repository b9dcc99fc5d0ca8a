"""benchmarks/bench_rl.py's report on made-up stage records: tables, summary lines and the PNG plot.

The bench itself (three RL stages and held-out evaluations, minutes) is run by hand, never here.
"""

from __future__ import annotations

from PIL import Image

from benchmarks.bench_rl import method_table, plot_curves, summary_line


def _heldout(generated: float, choice: float) -> dict:
    return {"all": {"n": 80, "generated": generated, "choice": choice},
            "image": {"n": 40, "generated": generated, "choice": choice}}


def _result(rewards: list[float], heldout: dict[int, tuple[float, float]]) -> dict:
    records = [{"step": i + 1, "reward_mean": r, "pass_rate": r / 2} for i, r in enumerate(rewards)]
    return {"records": records, "heldout": [{"step": s, **_heldout(*acc)} for s, acc in heldout.items()],
            "train_s": 31.4, "eval_s": 12.0}


SFT = _heldout(0.25, 0.5)
RESULTS = {"sapo": _result([0.4, 0.45, 0.5, 0.6], {2: (0.3, 0.55), 4: (0.375, 0.6)}),
           "grpo": _result([0.4, 0.35, 0.3, 0.2], {2: (0.2, 0.45), 4: (0.125, 0.4)})}


def test_summary_line_gives_reward_first_to_last_and_halves_and_heldout_sft_to_end():
    line = summary_line("sapo", RESULTS["sapo"], SFT)
    assert line.startswith("sapo  reward 0.400 -> 0.600 (steps 1 -> 4; half means 0.425 -> 0.550)")
    assert "held-out answer 25.0% -> 37.5%, best choice 50.0% -> 60.0%" in line
    assert "train 31 s, eval 12 s" in line
    assert "0.200" in summary_line("grpo", RESULTS["grpo"], SFT)


def test_table_shows_accuracy_at_step_zero_and_evaluated_steps_only():
    lines = method_table("grpo", RESULTS["grpo"], SFT)
    rows = {int(line.split()[0]): line.split() for line in lines[2:]}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert rows[0] == ["0", "25.0%", "50.0%"]
    assert rows[1] == ["1", "0.400", "20.0%"]
    assert rows[4] == ["4", "0.200", "10.0%", "12.5%", "40.0%"]


def test_plot_writes_a_two_panel_png(tmp_path):
    path = tmp_path / "sub" / "bench_rl.png"
    plot_curves(RESULTS, SFT, path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (1100, 400)  # figsize 11 x 4 inches at 100 dpi
        # both methods' curves are drawn in their own colours: more than the white background and black axes
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16)) > 20
