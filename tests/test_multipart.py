from __future__ import annotations

from edgemeter.metering.multipart import MAX_PARTS, fields, parts, upload
from tests.corpus import BOUNDARY, FORM, form


def test_a_form_is_read_by_part_name() -> None:
    body = form({"model": "whisper-1", "response_format": "text"}, b"RIFF....WAVE")
    found = parts(body, FORM)
    assert found["model"].data == b"whisper-1" and not found["model"].is_file
    assert found["file"].data == b"RIFF....WAVE" and found["file"].is_file


def test_fields_are_text_and_leave_files_out() -> None:
    body = form({"model": "gpt-image-1", "n": "2"}, b"\x89PNG")
    assert fields(body, FORM) == {"model": "gpt-image-1", "n": "2"}
    assert upload(body, FORM) == b"\x89PNG"


def test_a_json_body_gives_its_keys() -> None:
    assert fields(b'{"model":"dall-e-3","size":"1024x1792"}', "application/json") == {
        "model": "dall-e-3",
        "size": "1024x1792",
    }


def test_a_quoted_boundary_is_read() -> None:
    body = form({"model": "m"})
    assert fields(body, f'multipart/form-data; boundary="{BOUNDARY}"') == {"model": "m"}


def test_what_is_not_a_form_has_no_parts() -> None:
    assert parts(b"--x\r\n\r\n", "application/json") == {}
    assert parts(b"whatever", "multipart/form-data") == {}  # no boundary
    assert fields(b"not json", "text/plain") == {}
    assert upload(form({"model": "m"}), FORM) is None


def test_the_first_part_of_a_name_wins_and_parts_are_bounded() -> None:
    many = form({f"f{i}": str(i) for i in range(MAX_PARTS + 10)})
    assert len(parts(many, FORM)) == MAX_PARTS
    twice = form({"model": "first"}).replace(b"--\r\n", b"\r\n") + form({"model": "second"})
    assert fields(twice, FORM)["model"] == "first"
