"""Scale schedules: the shipped presets, every spec form, and a clear error for every bad one."""

import json
import re
from pathlib import Path

import pytest

from patchdb.errors import PatchdbError
from patchdb.scales import calibrate_command, calibrated_run, check_scales, paper_scales, parse_scales

PAPER_SCALES = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "paper-scales.json"
SCHEDULE = [3, 3, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15, 17, 17]


def test_paper_presets_ship_with_the_package():
    presets = paper_scales()
    if PAPER_SCALES.is_file():
        assert presets == json.loads(PAPER_SCALES.read_text())["scales"]
    assert presets, "no presets"
    for key, sizes in presets.items():
        assert parse_scales(f"paper:{key}", 20) == sizes
        assert len(sizes) == 20 and all(size % 2 == 1 and size > 0 for size in sizes)


def test_unknown_preset_names_the_choices():
    with pytest.raises(PatchdbError, match="fashion-mnist-resnet-zeros-conditional"):
        parse_scales("paper:fashion-mnist-resnt", 20)


def test_spec_forms(tmp_path):
    assert parse_scales(",".join(map(str, SCHEDULE)), 20) == SCHEDULE
    assert parse_scales(" 3, 5 ,7 ", 3) == [3, 5, 7]
    assert parse_scales("5", 4) == [5, 5, 5, 5]
    assert parse_scales(7, 2) == [7, 7]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(SCHEDULE))
    assert parse_scales(str(as_list), 20) == SCHEDULE
    run = tmp_path / "run"
    run.mkdir()
    (run / "scales.json").write_text(json.dumps({"scales": SCHEDULE, "machine": "bbels"}))
    assert parse_scales(f"calibrated:{run}", 20) == SCHEDULE
    assert parse_scales(str(run / "scales.json"), 20) == SCHEDULE


@pytest.mark.parametrize("spec, steps, message", [
    ("3,5,7", 4, "3 entries but the sampler has 4 steps"),
    ("paper:fashion-mnist-resnet-zeros-conditional", 10, "20 entries but the sampler has 10 steps"),
    ("3,4,5", 3, "entry 1 is 4"),
    ("4", 3, "positive odd"),
    ("3,0,5", 3, "entry 1 is 0"),
    ("3,-3,5", 3, "entry 1 is -3"),
    ("3,5.0,7", 3, "cannot read the scale schedule"),
    ("three", 3, "cannot read the scale schedule"),
    ("", 3, "cannot read the scale schedule"),
])
def test_bad_specs_raise_clear_errors(spec, steps, message):
    with pytest.raises(PatchdbError, match=message):
        parse_scales(spec, steps)


@pytest.mark.parametrize("content, message", [
    ("[3, 5,", "not valid JSON"),
    ('{"sizes": [3, 5, 7]}', "must hold a list"),
    ('"3,5,7"', "must hold a list"),
    ("[3, 5.0, 7]", "entry 1 is 5.0"),
    ("[3, true, 7]", "entry 1 is True"),
    ('[3, "5", 7]', "entry 1 is '5'"),
    ("[3, 5]", "2 entries"),
])
def test_bad_scale_files_raise_clear_errors(tmp_path, content, message):
    path = tmp_path / "scales.json"
    path.write_text(content)
    with pytest.raises(PatchdbError, match=message) as given_as_a_file:
        parse_scales(str(path), 3)
    with pytest.raises(PatchdbError, match=message) as calibrated:
        parse_scales(f"calibrated:{tmp_path}", 3)
    if "JSON" in message or "list" in message:  # the file as a whole is unusable: each error says how to write it again
        assert str(given_as_a_file.value).endswith(f"write it again with `patchdb calibrate --model RUN_DIR --out {path}`")
        assert str(calibrated.value).endswith(f"recalibrate: `patchdb calibrate --model {tmp_path} --steps 3`")


def test_missing_scale_files_say_how_to_make_one(tmp_path):
    with pytest.raises(PatchdbError, match="does not exist.*patchdb calibrate --model RUN_DIR --out"):
        parse_scales(str(tmp_path / "absent.json"), 3)
    with pytest.raises(PatchdbError, match="does not exist"):
        parse_scales(f"calibrated:{tmp_path / 'no-run'}", 3)


def test_a_calibrated_schedule_of_another_length_says_how_to_recalibrate_it(tmp_path):
    (tmp_path / "scales.json").write_text(json.dumps({"scales": [3, 5], "machine": "els"}))
    with pytest.raises(PatchdbError, match=re.escape(
            f"or change --steps, or recalibrate for 3 steps: `patchdb calibrate --model {tmp_path} --machine els --steps 3`")):
        parse_scales(f"calibrated:{tmp_path}", 3, "els")
    with pytest.raises(PatchdbError, match=r"or change --steps$"):  # a file given as such: no run to recalibrate
        parse_scales(str(tmp_path / "scales.json"), 3, "els")


def test_a_calibrated_spec_names_its_run_with_home_expanded_and_the_recalibrating_command_quotes_it(tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert calibrated_run("calibrated:~/my run") == tmp_path / "my run" and calibrated_run("3,5") is None
    assert calibrate_command(tmp_path / "my run", None, 3) == f"patchdb calibrate --model '{tmp_path / 'my run'}' --steps 3"
    # a folder named as an architecture: --model resnet would be the project's cached network
    assert calibrate_command(Path("resnet"), "ls", None) == "patchdb calibrate --model ./resnet --machine ls"


def test_a_calibrated_schedule_serves_only_the_machine_it_was_calibrated_for(tmp_path):
    (tmp_path / "scales.json").write_text(json.dumps({"scales": [3, 5, 7], "machine": "els"}))
    assert parse_scales(f"calibrated:{tmp_path}", 3, "els") == parse_scales(f"calibrated:{tmp_path}", 3) == [3, 5, 7]
    with pytest.raises(PatchdbError, match="calibrated for the els machine, not ls.*calibrate .*--machine ls"):
        parse_scales(str(tmp_path / "scales.json"), 3, "ls")


def test_check_scales_accepts_exactly_positive_odd_integers():
    assert check_scales([1, 3, 5], 3) == [1, 3, 5]
    for bad in ([3, 2, 5], [3, 5.0, 7], [3, False, 5], [3, None, 5]):
        with pytest.raises(PatchdbError, match="entry 1"):
            check_scales(bad, 3)
