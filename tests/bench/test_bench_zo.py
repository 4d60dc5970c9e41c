"""`edgetune bench zo`'s arithmetic: speed-ups against sequential MeZO at full depth and
the seconds each run takes to reach the reference run's final accuracy."""

from __future__ import annotations

from edgetune.bench import zo


def _results(mezo_full: float, prge_top: dict[int, float]) -> dict:
    step = {"step_s": 1.0, "peak_mb": 10.0, "threads": 2}
    results = {("inference", r, zo.BLOCKS): step for r in (1, 2, 4, 8, 16, 32)}
    results |= {(m, q, zo.BLOCKS): step for m in zo.METHODS for q in zo.QUERIES}
    for q in zo.QUERIES:
        for k in zo.TRUNK_TOPS:
            for mode in ("mezo", "prge", "floor"):
                results[(mode, q, k)] = dict(step)
    results[("mezo", 4, zo.BLOCKS)]["step_s"] = mezo_full
    for k, seconds in prge_top.items():
        results[("prge", 4, k)]["step_s"] = seconds
    return results


def test_the_headline_compares_p_rge_with_a_shared_trunk_to_sequential_mezo_at_q4():
    # Prepare: MeZO at q=4 on all blocks 4 s; P-RGE 2 s at k=6 and 1 s at k=2
    results = _results(4.0, {2: 1.0, 4: 1.5, 6: 2.0, 10: 3.0})
    # Execute
    text = "\n".join(zo.render_trunk(results))
    # Assert
    assert "2.00x faster per step than sequential MeZO at q = 4 on all blocks with k = 6" in text
    assert "4.00x at k = 2" in text
    assert "| 4 | 4 | 6 | 1.00 | 2.00 | 1.00 | 2.00 | 4.00x | 2.00x | 10 / 10 |" in text


def test_time_to_target_is_the_first_evaluation_at_the_demo_settings_final_accuracy():
    # Prepare: the demo run ends at 0.8 after 200 s; one run reaches it at 50 s, one never
    def points(*pairs):
        return [
            {"step": 10 * i, "train_s": s, "eval/accuracy": a} for i, (s, a) in enumerate(pairs)
        ]

    curves = {
        "demo": points((0, 0.5), (100, 0.7), (200, 0.8)),
        "fast": points((0, 0.5), (50, 0.85), (90, 0.82)),
        "slow": points((0, 0.5), (100, 0.6)),
    }
    # Execute
    text = "\n".join(zo.render_curves(curves, "docs/p.png", "docs/B.md"))
    # Assert
    assert "| demo | 20 | 0.800 | 200 | 200 | 1.00x |" in text
    assert "| fast | 20 | 0.820 | 90 | 50 | 4.00x |" in text
    assert "| slow | 10 | 0.600 | 100 | not reached | - |" in text
    assert zo.reached(curves["fast"], 0.84) == 50
