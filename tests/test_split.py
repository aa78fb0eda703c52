import numpy as np
import pytest

from conftest import people, write_competition
from harness.data.readers import read_competition_train
from harness.data.split import split_by_person


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    return read_competition_train(write_competition(root, people(30))).frame


def test_no_person_in_both_parts_and_every_image_used(frame):
    split = split_by_person(frame, 0.2, seed=0)
    train, valid = set(frame["person"].iloc[split.train]), set(frame["person"].iloc[split.valid])
    assert not train & valid
    assert len(split.train) + len(split.valid) == len(frame)
    assert len(np.intersect1d(split.train, split.valid)) == 0
    assert 0.1 < len(valid) / frame["person"].nunique() < 0.3


def test_rare_age_group_appears_in_valid(frame):
    for seed in range(5):
        split = split_by_person(frame, 0.2, seed=seed)
        assert (frame["age"].iloc[split.valid] == 2).any()
        assert set(frame["gender"].iloc[split.valid]) == {0, 1}


def test_split_is_deterministic_and_hash_tracks_it(frame):
    a, b, c = split_by_person(frame, 0.2, 0), split_by_person(frame, 0.2, 0), split_by_person(frame, 0.2, 1)
    assert a.hash == b.hash and (a.valid == b.valid).all()
    assert a.hash != c.hash


def test_too_few_persons_is_a_clear_error(frame):
    few = frame[frame["person"].isin(frame["person"].unique()[:2])]
    few.attrs.update(frame.attrs)
    with pytest.raises(ValueError, match="2 persons cannot be split"):
        split_by_person(few, 0.2)
