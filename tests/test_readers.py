import pandas as pd
import pytest

from conftest import STEMS, people, write_competition, write_image
from harness.data.labels import decode
from harness.data.readers import (
    DataError,
    read_competition_eval,
    read_competition_train,
    read_csv_index,
    read_image_folder,
    read_train,
)


def errors_of(index):
    return [str(p) for p in index.errors]


def test_competition_train_index_has_labels_persons_and_skips_junk(tmp_path):
    folders = people(6)
    write_competition(tmp_path, folders)
    person = tmp_path / "train" / "images" / folders[0]
    (person / "._mask1.jpg").write_bytes(b"\x00\x05junk")
    (person / ".DS_Store").write_bytes(b"junk")
    index = read_competition_train(tmp_path)
    frame = index.frame
    assert len(frame) == 6 * 7
    assert frame["person"].nunique() == 6
    assert not index.errors
    assert sum("junk file skipped" in str(p) for p in index.problems) == 2
    row = frame[frame["image_id"] == f"{folders[3]}/incorrect_mask"].iloc[0]  # female, age 45
    assert (row["mask"], row["gender"], row["age"], row["age_years"]) == (1, 1, 1, 45)
    assert row["label"] == 1 * 6 + 1 * 3 + 1
    assert set(frame["label"]) <= set(range(18))
    mask, gender, age = decode(frame["label"].to_numpy())
    assert (mask == frame["mask"]).all() and (gender == frame["gender"]).all() and (age == frame["age"]).all()
    assert frame.attrs["num_classes"] == 18 and frame.attrs["tasks"]


def test_mixed_extensions_in_any_case_are_read(tmp_path):
    write_competition(tmp_path, people(4))
    suffixes = {p.rsplit(".", 1)[1] for p in read_competition_train(tmp_path).frame["path"]}
    assert suffixes == {"jpg", "jpeg", "png", "JPG"}


def test_age_bounds_are_configurable(tmp_path):
    write_competition(tmp_path, ["000001_female_Asian_58", "000002_male_Asian_59"])
    default = read_competition_train(tmp_path).frame.groupby("person")["age"].first()
    shifted = read_competition_train(tmp_path, age_bounds=(30, 58)).frame.groupby("person")["age"].first()
    assert default.tolist() == [1, 1]
    assert shifted.tolist() == [2, 2]


def test_folder_not_id_is_the_person(tmp_path):
    write_competition(tmp_path, ["000007_male_Asian_25", "000007_female_Asian_61", "000008_male_Asian_33"])
    index = read_competition_train(tmp_path)
    assert index.frame["person"].nunique() == 3
    assert any("id 000007 names 2 folders" in str(p) for p in index.problems)
    assert not index.errors


@pytest.mark.parametrize("folder, expected", [
    ("000001_robot_Asian_30", "unknown gender 'robot'"),
    ("000001_male_Asian_thirty", "age 'thirty' is not a whole number"),
    ("000001-male-Asian-30", "not <id>_<gender>_<race>_<age>"),
])
def test_unparseable_folders_are_errors_naming_the_folder(tmp_path, folder, expected):
    write_competition(tmp_path, [folder, "000002_male_Asian_30"],
                      csv_rows=[dict(id="000002", gender="male", race="Asian", age="30", path="000002_male_Asian_30")])
    index = read_competition_train(tmp_path)
    assert any(folder in e and expected in e for e in errors_of(index))
    with pytest.raises(DataError, match=expected):
        index.raise_on_errors()


def test_person_with_six_of_seven_images_is_reported(tmp_path):
    write_competition(tmp_path, people(2))
    (tmp_path / "train" / "images" / people(2)[0] / "mask3.jpg").unlink()
    assert any("has 6 of 7 images" in e and "mask3" in e for e in errors_of(read_competition_train(tmp_path)))


def test_zero_byte_image_is_reported(tmp_path):
    write_competition(tmp_path, people(2))
    (tmp_path / "train" / "images" / people(2)[1] / "normal.jpeg").write_bytes(b"")
    assert any("normal.jpeg" in e and "zero-byte" in e for e in errors_of(read_competition_train(tmp_path)))


def test_csv_disagreeing_with_folder_is_reported(tmp_path):
    folders = people(2)
    rows = [dict(id=f.split("_")[0], gender="female", race="Asian", age=f.split("_")[3], path=f) for f in folders]
    write_competition(tmp_path, folders, csv_rows=rows)
    assert any("the folder name says otherwise" in e for e in errors_of(read_competition_train(tmp_path)))


def test_wrong_train_csv_columns_name_the_file_and_columns(tmp_path):
    write_competition(tmp_path, people(2), csv_rows=[dict(ident="1", sex="male")])
    with pytest.raises(DataError, match=r"train\.csv: missing column\(s\) \['id', 'gender', 'race', 'age', 'path'\]"):
        read_competition_train(tmp_path)


def test_corrections_change_person_and_image_labels(tmp_path):
    folders = people(3)
    write_competition(tmp_path, folders)
    corrections = tmp_path / "fix.csv"
    pd.DataFrame([dict(target=folders[0], gender="female", age="70", mask=""),
                  dict(target=f"{folders[1]}/normal.jpeg", gender="", age="", mask="incorrect_mask")]
                 ).to_csv(corrections, index=False)
    frame = read_competition_train(tmp_path, corrections=corrections).frame.set_index("image_id")
    assert (frame.loc[frame["person"] == folders[0], "gender"] == 1).all()
    assert (frame.loc[frame["person"] == folders[0], "age"] == 2).all()
    assert frame.loc[f"{folders[1]}/normal", "mask"] == 1
    assert frame.loc[f"{folders[1]}/mask1", "mask"] == 0


def test_correction_path_escaping_the_root_is_rejected(tmp_path):
    write_competition(tmp_path, people(1))
    corrections = tmp_path / "fix.csv"
    pd.DataFrame([dict(target="../../etc/passwd", gender="male", age="", mask="")]).to_csv(corrections, index=False)
    with pytest.raises(DataError, match="escapes the data root"):
        read_competition_train(tmp_path, corrections=corrections)


def write_eval(root, ids, gt=None):
    for i, image_id in enumerate(ids):
        write_image(root / "eval" / "images" / image_id, 100 + i)
    pd.DataFrame(dict(ImageID=ids, ans=0)).to_csv(root / "eval" / "info.csv", index=False)
    if gt is not None:
        pd.DataFrame(dict(ImageID=ids, ans=gt)).to_csv(root / "eval" / "gt.csv", index=False)


def test_eval_index_keeps_info_order_and_reads_ground_truth(tmp_path):
    ids = ["ff" * 20 + ".jpg", "0a" * 20 + ".jpg", "1b" * 20 + ".jpg"]
    write_eval(tmp_path, ids, gt=[17, 0, 8])
    frame = read_competition_eval(tmp_path).frame
    assert frame["image_id"].tolist() == ids
    assert frame["label"].tolist() == [17, 0, 8]
    assert frame.loc[0, ["mask", "gender", "age"]].tolist() == [2, 1, 2]


def test_eval_without_ground_truth_has_unknown_labels(tmp_path):
    write_eval(tmp_path, ["ab" * 20 + ".jpg"])
    assert read_competition_eval(tmp_path).frame["label"].tolist() == [-1]


def test_eval_path_escape_is_rejected(tmp_path):
    write_eval(tmp_path, ["ab" * 20 + ".jpg"])
    pd.DataFrame(dict(ImageID=["../../secret.jpg"], ans=0)).to_csv(tmp_path / "eval" / "info.csv", index=False)
    with pytest.raises(DataError, match="escapes the data root"):
        read_competition_eval(tmp_path)


def test_image_folder_layout(tmp_path):
    for label in ["cat", "dog"]:
        for i in range(3):
            write_image(tmp_path / label / f"{i}.png", i)
    (tmp_path / "dog" / "._0.png").write_bytes(b"junk")
    frame = read_image_folder(tmp_path).frame
    assert len(frame) == 6
    assert frame.attrs["class_names"] == ["cat", "dog"] and frame.attrs["num_classes"] == 2
    assert frame.groupby("label").size().tolist() == [3, 3]
    assert not frame.attrs["tasks"]


def test_csv_layout_with_groups_and_escape_check(tmp_path):
    for i in range(4):
        write_image(tmp_path / "img" / f"{i}.jpg", i)
    pd.DataFrame(dict(path=[f"img/{i}.jpg" for i in range(4)], label=["b", "a", "b", "a"],
                      group=["g1", "g1", "g2", "g2"])).to_csv(tmp_path / "index.csv", index=False)
    frame = read_csv_index(tmp_path, "index.csv").frame
    assert frame["label"].tolist() == [1, 0, 1, 0]
    assert frame["person"].tolist() == ["g1", "g1", "g2", "g2"]
    pd.DataFrame(dict(path=["../outside.jpg"], label=["a"])).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="escapes the data root"):
        read_csv_index(tmp_path, "bad.csv")


def test_missing_images_folder_says_what_layout_is_expected(tmp_path):
    with pytest.raises(DataError, match="train/images/<id>_<gender>_<race>_<age>"):
        read_competition_train(tmp_path)


def test_unexpected_file_names_are_warned_and_skipped(tmp_path):
    write_competition(tmp_path, people(1))
    write_image(tmp_path / "train" / "images" / people(1)[0] / "selfie.jpg", 1)
    index = read_competition_train(tmp_path)
    assert len(index.frame) == len(STEMS)
    assert any("selfie.jpg" in str(p) and p.severity == "warning" for p in index.problems)


# ------------------------------------------------------------------------ sample datasets


@pytest.mark.parametrize("sample, images, classes", [("digits", 1797, [str(d) for d in range(10)]),
                                                     ("faces", 200, ["face", "non_face"])])
def test_a_sample_dataset_is_written_as_an_image_folder_on_first_use(tmp_path, sample, images, classes):
    from harness.config import DataConfig
    from harness.data.prepare import ensure_dataset

    data = DataConfig(format="imagefolder", root=tmp_path / sample, sample=sample)
    ensure_dataset(data)
    index = read_train(data)
    assert len(index.frame) == images and index.frame.attrs["class_names"] == classes
    assert index.frame["person"].is_unique  # each image is its own group
    assert not list(tmp_path.glob("*.partial-*"))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / sample).rglob("*.png")}
    ensure_dataset(data)  # there already: left as it is
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / sample).rglob("*.png")} == before


def test_a_sample_needs_the_image_folder_format_and_a_known_name(tmp_path):
    from harness.config import ConfigError, parse_study
    from harness.preflight import name_problems

    problems = name_problems(parse_study("name: x\ndata: {format: imagefolder, sample: mnist}\n"))
    assert problems[0].startswith("data.sample: unknown sample dataset 'mnist'; choose one of ['digits', ")
    with pytest.raises(ConfigError, match="set format: imagefolder"):
        parse_study("name: x\ndata: {format: competition, sample: digits}\n")
