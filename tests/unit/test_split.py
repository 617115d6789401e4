import pytest

from tunelab.data.collate import PaddedCollator
from tunelab.data.split import mix_sources, split_items
from tunelab.errors import ConfigError


def test_split_is_deterministic_disjoint_and_sized():
    items = list(range(100))
    a = split_items(items, val_size=0.1, test_size=0.2, seed=3)
    b = split_items(items, val_size=0.1, test_size=0.2, seed=3)
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    assert len(a.test) == 20 and len(a.validation) == 8 and len(a.train) == 72
    assert set(a.train).isdisjoint(a.test) and set(a.validation).isdisjoint(a.test)
    assert sorted(a.train + a.validation + a.test) == items
    c = split_items(items, val_size=0.1, test_size=0.2, seed=4)
    assert c.test != a.test


def test_absolute_counts_and_too_large_split():
    split = split_items(list(range(10)), val_size=2, test_size=3, seed=0)
    assert len(split.validation) == 2 and len(split.test) == 3
    with pytest.raises(ConfigError, match="data.test_size: 10 leaves no training samples out of 10"):
        split_items(list(range(10)), val_size=0, test_size=10, seed=0)


def test_equal_weights_keep_everything_once():
    mixed, counts = mix_sources([(["a"] * 3, 1.0), (["b"] * 5, 1.0)], seed=0)
    assert counts == [3, 5] and sorted(mixed) == ["a"] * 3 + ["b"] * 5


def test_weighted_mix_hits_target_shares():
    task = [f"t{i}" for i in range(800)]
    general = [f"g{i}" for i in range(200)]
    mixed, counts = mix_sources([(task, 1.0), (general, 1.0 / 3)], seed=7)
    assert counts == [750, 250]
    share = sum(1 for x in mixed if x.startswith("g")) / len(mixed)
    assert abs(share - 0.25) < 1e-9
    assert len(set(x for x in mixed if x.startswith("g"))) == 200  # upsampled: every general item kept
    again, _ = mix_sources([(task, 1.0), (general, 1.0 / 3)], seed=7)
    assert again == mixed


def test_collator_pads_to_longest_in_batch_not_cutoff():
    batch = PaddedCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                           {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = PaddedCollator(pad_token_id=0, padding_side="left")([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert left["input_ids"].tolist() == [[1, 2], [0, 3]]


def test_a_dataset_without_one_readable_record_is_named(tmp_path):
    from tunelab.config.schema import DataConfig
    from tunelab.data.build import load_splits
    from tunelab.errors import DataError

    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: no readable records \(2 bad ones skipped\)"):
        load_splits(DataConfig(datasets=[{"path": str(path)}], on_bad_record="skip"))
