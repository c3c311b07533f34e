"""compare never reports a collapse as a result (issue 19 item 3): each row carries its metric before and
after and the no-skill baseline; a row at or below it, or whose loss did not fall, is flagged, not ranked."""

from lorakit.recipes.compare import markdown_table, ranked
from lorakit.recipes.verdict import majority_share, verdict

ROW = dict(method="lora", metric_name="accuracy", metric_before=0.50, baseline=0.5367, loss_first=0.69,
           loss_last=0.45, steps=200, lr=2e-4, trainable_params=1000, trainable_pct=0.1, train_seconds=10.0,
           step_seconds=0.1, peak_rss_mib=500.0, latency_unmerged_ms=1.0, latency_merged_ms=1.0,
           adapter_bytes=2048)


def test_majority_share_is_what_predicting_one_class_scores():
    assert majority_share([1, 1, 0, 1]) == 0.75 and majority_share([]) is None


def test_one_class_predicted_is_not_learned_and_says_why():
    """`compare --set data.max_train_rows=300` printed 0.5367 for full, LoRA, DoRA and QLoRA alike."""
    ok, why = verdict({**ROW, "metric": 0.5367, "steps": 9})
    assert not ok and "majority-class baseline 0.5367" in why and "too few steps (9)" in why
    ok, why = verdict({**ROW, "metric": 0.5367, "loss_last": 0.69})
    assert not ok and "loss did not fall" in why and "lr 0.0002 may not suit lora" in why
    assert verdict({**ROW, "metric": 0.78}) == (True, "learned")


def test_perplexity_must_fall_below_the_untrained_models():
    sft = {**ROW, "metric_name": "perplexity", "metric_before": 300.0, "baseline": 300.0}
    assert verdict({**sft, "metric": 120.0})[0] and not verdict({**sft, "metric": 299.0})[0]


def test_the_table_ranks_only_what_learned_with_one_precision():
    rows = []
    for name, metric, loss_last in (("full", 0.5367, 0.69), ("lora", 0.781, 0.45), ("dora", 0.79, 0.44)):
        r = {**ROW, "name": name, "metric": metric, "loss_last": loss_last}
        r["learned"], r["verdict"] = verdict(r)
        rows.append(r)
    assert [r["name"] for r in ranked(rows)] == ["dora", "lora", "full"]
    md = markdown_table(rows)
    assert "0.5000 -> 0.7810" in md and "0.5000 -> 0.7900" in md and "0.5000 -> 0.5367 (not learned)" in md
    assert md.index("| dora |") < md.index("| lora |") < md.index("| full |")
    assert "Not ranked (they did not learn):\n- full: not learned:" in md and "| 0.5367 |" in md
