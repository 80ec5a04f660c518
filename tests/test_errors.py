"""`one_line`: how any exception's message reaches the user's terminal."""

from starqa.errors import StarqaError, describe, one_line


def test_one_line_joins_lines_and_collapses_whitespace():
    assert one_line(ValueError("bad header\n  at offset 12\t(expected  4 bytes)")) == (
        "bad header at offset 12 (expected 4 bytes)")


def test_one_line_cuts_long_messages_with_an_ellipsis():
    message = one_line(OSError("x" * 500), 120)
    assert len(message) == 120 and message.endswith("...")
    assert one_line(OSError("short"), 120) == "short"


def test_one_line_names_the_exception_when_it_has_no_message():
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError("  \n ")) == "RuntimeError"


def test_describe_names_the_class_of_errors_that_are_not_ours():
    assert describe(StarqaError("document 'x' is damaged:\n  text.txt")) == "document 'x' is damaged: text.txt"
    assert describe(RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")) == (
        "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB")
