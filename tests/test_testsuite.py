"""``aflkd test`` counts a test as run only if it did not skip."""
from launch.testsuite import read_junit


def test_skips_do_not_count_as_run(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="3"/></testsuites>')
    counts = read_junit(xml)
    assert (counts.ran, counts.skipped, counts.ok) == (2, 3, False)


def test_missing_report_means_nothing_ran(tmp_path):
    counts = read_junit(tmp_path / "absent.xml")
    assert counts.ran == 0 and counts.ok
