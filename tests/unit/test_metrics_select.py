from tunelab.evaluate.metrics.select import infer_label_set


def test_numbers_repeating_by_chance_in_a_large_mixed_set_are_not_labels():
    labels = ["positive", "negative", "shoes", "home"] * 30  # 120 class answers
    numbers = [str(n) for n in range(100)] * 2  # every number twice: chance repeats
    found = infer_label_set(labels + numbers)
    assert found == {"positive", "negative", "shoes", "home"}
