"""Hardening: bad input, crashes, damage, a full disk and concurrent use never corrupt the store or leave a user
guessing. Everything runs on the tiny random-weight model; most commands run in-process (`starqa.cli.main`), and
only what needs a real process (SIGKILL, two processes at once, stdout/stderr of the real command) runs one."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clihelp import REPO, json_lines, starqa, tree_snapshot
from conftest import tiny_model
from starqa import cli

DOCUMENT = (
    "Clause 1. The supplier delivers the reports every Tuesday.\n\n"
    "Clause 2. Either party may end this agreement with ninety days of written notice.\n\n"
    "Clause 3. The fee is 4,200 euros per month, payable within thirty days.\n\n"
) * 4
NEW_VERSION = DOCUMENT + "Clause 4. The supplier keeps all records for seven years.\n"
# The second half edited as well: a re-ingest over DOCUMENT (block size 48) takes its first 4 blocks over and
# encodes 3 (NEW_VERSION only appends, so all but its last block are taken over).
EDITED_VERSION = (DOCUMENT[:len(DOCUMENT) // 2]
                  + DOCUMENT[len(DOCUMENT) // 2:].replace("every Tuesday", "every Thursday")
                  + "Clause 4. The supplier keeps all records for seven years.\n")
QUESTION = "What is the fee?"


def run(capsys, *args: str) -> tuple[int, str, str]:
    """`starqa ARGS` in this process: (exit code, stdout, stderr)."""
    code = cli.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(stderr: str) -> list[str]:
    """The `starqa: error:` lines; the last must end stderr (a message that ran onto more lines would not)."""
    lines = [line for line in stderr.splitlines() if line.startswith("starqa: error:")]
    if lines:
        assert stderr.endswith(lines[-1] + "\n"), f"more after the error line: {stderr[-300:]!r}"
    return lines


def _write_pdf(path: Path, lines: list[str]) -> None:
    from reportlab.pdfgen.canvas import Canvas

    canvas = Canvas(str(path), pagesize=(595, 842))
    canvas.setFont("Helvetica", 10)
    for number, line in enumerate(lines):
        canvas.drawString(72, 760 - 14 * number, line)
    canvas.showPage()
    canvas.save()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One file (or folder) per kind of bad input, plus good ones to pair with bad options."""
    import pypdf
    from reportlab.pdfgen.canvas import Canvas

    folder = tmp_path_factory.mktemp("inputs")
    (folder / "terms.txt").write_text(DOCUMENT, encoding="utf-8")
    (folder / "v2.txt").write_text(NEW_VERSION, encoding="utf-8")
    (folder / "edited.txt").write_text(EDITED_VERSION, encoding="utf-8")
    (folder / "long.txt").write_text(DOCUMENT * 3, encoding="utf-8")
    (folder / "folder").mkdir()
    (folder / "folder" / "terms.txt").write_text(NEW_VERSION, encoding="utf-8")  # the same stem as terms.txt
    (folder / "empty.txt").write_bytes(b"")
    (folder / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    (folder / "bin.txt").write_bytes(random.Random(16).randbytes(4096).replace(b"\x00", b"\x01"))  # no NUL
    (folder / "latin1.txt").write_bytes("Clause 1. The fee is 4,200 \u20ac; caf\u00e9 ".encode("utf-8")
                                        + b"na\xefve \xff clause.\n")
    (folder / "corrupt.pdf").write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8 + b"\n%%EOF\n")
    _write_pdf(folder / "plain.pdf", ["Clause 1. The fee is 4,200 euros per month.",
                                      "Clause 2. Either party may end this agreement with notice."])
    writer = pypdf.PdfWriter(clone_from=folder / "plain.pdf")
    writer.encrypt("s3cret", algorithm="RC4-128")  # RC4 needs no crypto library
    with open(folder / "locked.pdf", "wb") as handle:
        writer.write(handle)
    canvas = Canvas(str(folder / "scan.pdf"))
    canvas.rect(72, 72, 300, 400, fill=1)  # a page with a picture and no text
    canvas.showPage()
    canvas.save()
    (folder / "not-yaml.yaml").write_text("block_size: [1024\nanchor_size: 3\n")
    (folder / "unknown-key.yaml").write_text("blok_size: 512\n")
    (folder / "wrong-type.yaml").write_text("block_size: large\n")
    (folder / "questions.txt").write_text(f"{QUESTION}\nWhen are the reports delivered?\n")
    return folder


@pytest.fixture(scope="module")
def small_window_model(tmp_path_factory, bundled_tokenizer) -> Path:
    """The tiny model with a 256-token context window: `long.txt` does not fit in it."""
    directory = tmp_path_factory.mktemp("tiny-llama-256")
    tiny_model("llama", max_position_embeddings=256).save_pretrained(directory)
    bundled_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def stocked(tmp_path_factory, inputs, tiny_model_dir) -> Path:
    """A store holding the document 'terms' (block size 48): what every bad input must leave untouched."""
    home = tmp_path_factory.mktemp("stocked") / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STARQA_HOME", str(home))
        assert cli.main(["ingest", str(inputs / "terms.txt"), "--block-size", "48", "--model",
                         str(tiny_model_dir), "--quiet"]) == 0
    return home


def _ingest(capsys, source: Path, model: Path, *extra: str) -> None:
    code, _, err = run(capsys, "ingest", source, "--block-size", "48", "--model", model, *extra)
    assert code == 0, err


def _answer(capsys, model: Path, doc: str = "terms") -> str:
    code, out, err = run(capsys, "ask", "--doc", doc, QUESTION, "--json", "--max-new-tokens", "6", "--model", model)
    assert code == 0, err
    return json_lines(out)[0]["answer"]


# ------------------------------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    # (case, argv from (inputs folder, tiny model dir, small-window model dir), exit code, fragment of the error)
    ("missing path", lambda i, m, s: ["ingest", i / "nope.txt"], 2, "does not exist: check the path"),
    ("a directory", lambda i, m, s: ["ingest", i / "folder"], 2, "is a directory, not a file"),
    ("missing among several", lambda i, m, s: ["ingest", i / "terms.txt", i / "nope.txt"], 2, "does not exist"),
    ("two files, one name", lambda i, m, s: ["ingest", i / "terms.txt", i / "folder" / "terms.txt", "--force"], 2,
     "would both be stored as 'terms'"),
    ("--update with --name over several files", lambda i, m, s: ["ingest", i / "terms.txt", i / "v2.txt", "--update",
                                                                 "--name", "terms"], 2,
     "--update with --name names one document, but 2 files were given; drop --name"),
    ("--update with --force", lambda i, m, s: ["ingest", i / "terms.txt", "--update", "--force"], 2,
     "--update skips unchanged files and --force replaces them: pass one of the two"),
    ("empty file", lambda i, m, s: ["ingest", i / "empty.txt", "--model", m], 1, "is empty"),
    ("binary file as text", lambda i, m, s: ["ingest", i / "binary.txt", "--model", m], 1,
     "looks like a binary file"),
    ("random bytes without NUL as text", lambda i, m, s: ["ingest", i / "bin.txt", "--model", m], 1,
     "looks like a binary file"),
    ("corrupt PDF", lambda i, m, s: ["ingest", i / "corrupt.pdf", "--model", m], 1, "is not a readable PDF"),
    ("encrypted PDF", lambda i, m, s: ["ingest", i / "locked.pdf", "--model", m], 1,
     "is encrypted: pass --password"),
    ("wrong password", lambda i, m, s: ["ingest", i / "locked.pdf", "--password", "guess", "--model", m], 1,
     "the password is wrong"),
    ("PDF without text", lambda i, m, s: ["ingest", i / "scan.pdf", "--model", m], 1, "has no text layer"),
    ("longer than the context", lambda i, m, s: ["ingest", i / "long.txt", "--model", s], 2,
     "but the model reads at most 256; use a model with a longer context, or pass --allow-long"),
    ("block size zero", lambda i, m, s: ["ingest", i / "terms.txt", "--block-size", "0"], 2,
     "setting 'block_size' must be a positive number of tokens or auto, not 0"),
    ("block size negative", lambda i, m, s: ["ingest", i / "terms.txt", "--block-size", "-8"], 2,
     "setting 'block_size' must be a positive number of tokens or auto, not -8"),
    ("anchor size zero", lambda i, m, s: ["ingest", i / "terms.txt", "--anchor-size", "0"], 2,
     "anchor size must be a positive number of tokens, not 0"),
    ("anchor size negative", lambda i, m, s: ["ask", "--doc", "terms", QUESTION, "--anchor-size", "-1"], 2,
     "anchor size must be a positive number of tokens, not -1"),
    ("block size not a number", lambda i, m, s: ["ingest", i / "terms.txt", "--block-size", "many"], 2,
     "setting 'block_size' must be a positive number of tokens or auto, not 'many'"),
    ("missing --doc", lambda i, m, s: ["ask", QUESTION], 2, "give --doc NAME (a stored document, a glob over stored names, or a file), or --all"),
    ("name with a separator", lambda i, m, s: ["ingest", i / "terms.txt", "--name", "a/b"], 2, "path separator"),
    ("name with a backslash", lambda i, m, s: ["ingest", i / "terms.txt", "--name", "a\\b"], 2, "path separator"),
    ("name ..", lambda i, m, s: ["ingest", i / "terms.txt", "--name", ".."], 2, "contains '..'"),
    ("name with .. inside", lambda i, m, s: ["ingest", i / "terms.txt", "--name", "a..b"], 2, "contains '..'"),
    ("name with a leading dot", lambda i, m, s: ["ingest", i / "terms.txt", "--name", ".hidden"], 2,
     "starts with a dot"),
    ("name with control characters", lambda i, m, s: ["ingest", i / "terms.txt", "--name", "a\x1b[31mb"], 2,
     "control characters"),
    ("name too long", lambda i, m, s: ["ingest", i / "terms.txt", "--name", "x" * 101], 2,
     "101 characters long; use at most 100"),
    ("name too long in UTF-8", lambda i, m, s: ["ingest", i / "terms.txt", "--name", "\u5951" * 40], 2,
     "120 bytes long in UTF-8 (40 characters); use at most 100 bytes"),
    ("unknown document (ask)", lambda i, m, s: ["ask", "--doc", "term", QUESTION], 2,
     "no document named 'term'"),
    ("unknown document (info)", lambda i, m, s: ["info", "terms-v1"], 2, "did you mean terms?"),
    ("unknown document (verify)", lambda i, m, s: ["verify", "zzzz"], 2, "`starqa list` shows what is stored"),
    ("unknown document among several (rm)", lambda i, m, s: ["rm", "terms", "term"], 2,
     "no document named 'term'"),
    ("bad document name (ask)", lambda i, m, s: ["ask", "--doc", "../terms", QUESTION], 2, "path separator"),
    ("unknown model (ingest)", lambda i, m, s: ["ingest", i / "terms.txt", "--model", "no-such-model"], 2,
     "unknown model 'no-such-model'"),
    ("unknown model (ask)", lambda i, m, s: ["ask", "--doc", "terms", QUESTION, "--model", "no-such-model"], 2,
     "unknown model 'no-such-model'"),
    ("model folder without config.json", lambda i, m, s: ["ingest", i / "terms.txt", "--model", i / "folder"], 2,
     "has no config.json"),
    ("config that is not YAML", lambda i, m, s: ["list", "--config", i / "not-yaml.yaml"], 2, "is not valid YAML"),
    ("config with an unknown key", lambda i, m, s: ["ingest", i / "terms.txt", "--config", i / "unknown-key.yaml"],
     2, "unknown setting 'blok_size'"),
    ("config with a wrong type", lambda i, m, s: ["ask", "--doc", "terms", QUESTION, "--config",
                                                  i / "wrong-type.yaml"], 2,
     "setting 'block_size'"),
    ("config file missing", lambda i, m, s: ["info", "terms", "--config", i / "nope.yaml"], 2,
     "config file not found"),
    ("config path through a file", lambda i, m, s: ["list", "--config", i / "terms.txt" / "c.yaml"], 2,
     "cannot read config file"),
    ("no question", lambda i, m, s: ["ask", "--doc", "terms"], 2, "give one question"),
    ("bad --attention", lambda i, m, s: ["ask", "--doc", "terms", QUESTION, "--attention", "sparse"], 2,
     "--attention must be star, full or hybrid"),
]


@pytest.mark.parametrize("case,argv,code,fragment", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_clear_line_the_right_exit_code_and_nothing_written(
        capsys, monkeypatch, stocked, inputs, tiny_model_dir, small_window_model, case, argv, code, fragment):
    monkeypatch.setenv("STARQA_HOME", str(stocked))
    before = tree_snapshot(stocked)
    exit_code, out, err = run(capsys, *argv(inputs, tiny_model_dir, small_window_model))
    assert exit_code == code, err
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in err
    assert out == ""
    assert tree_snapshot(stocked) == before
    assert not list((stocked / "objects").glob(".tmp-*"))


def test_no_arguments_print_the_help_without_an_error_line(capsys):
    code, out, err = run(capsys)
    assert code == 2 and "Usage" in out + err and "ingest" in out + err
    assert error_lines(err) == []


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch, home, inputs, tiny_model_dir):
    from starqa.engine import ingest

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest, "_phase1", interrupted)
    code, out, err = run(capsys, "ingest", inputs / "terms.txt", "--model", tiny_model_dir)
    assert code == 130 and out == ""
    assert error_lines(err) == ["starqa: error: interrupted"] and "Traceback" not in err
    assert not list((home / "objects").glob(".tmp-*"))  # the staging folder is gone, nothing was stored
    assert run(capsys, "list")[1] == ""


def test_list_does_not_show_a_writers_temporary_link(capsys, home, inputs, tiny_model_dir):
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    target = os.readlink(home / "documents" / "terms")
    os.symlink(target, home / "documents" / ".link-terms.0123abcd")  # as in the instant before a link swap
    code, out, err = run(capsys, "list")
    assert code == 0 and error_lines(err) == [] and ".link" not in out and "terms" in out


def test_a_file_saved_again_while_it_is_extracted_is_not_stored(capsys, monkeypatch, home, inputs, tiny_model_dir,
                                                               tmp_path):
    import starqa.documents.extraction

    source = tmp_path / "draft.txt"
    source.write_text(DOCUMENT, encoding="utf-8")
    extract = starqa.documents.extraction.extract_document

    def extract_then_save(path, **kwargs):
        extracted = extract(path, **kwargs)
        time.sleep(0.01)
        source.write_text(NEW_VERSION, encoding="utf-8")  # the editor saves while starqa reads
        return extracted

    monkeypatch.setattr(starqa.documents.extraction, "extract_document", extract_then_save)
    code, out, err = run(capsys, "ingest", source, "--block-size", "48", "--model", tiny_model_dir)
    assert code == 1 and error_lines(err) == [
        f"starqa: error: '{source}' changed while it was being read; nothing was stored: try again"]
    assert run(capsys, "list")[1] == ""


def test_a_pipe_is_told_apart_by_its_text(capsys, home, tiny_model_dir, tmp_path):
    """A named pipe (or `<(command)`) can be read only once: its text, not a second read, identifies it."""
    import threading

    def ingest_from_pipe(text: str, *extra: str) -> tuple[int, str]:
        pipe = tmp_path / "notes.txt"
        pipe.unlink(missing_ok=True)
        os.mkfifo(pipe)
        writer = threading.Thread(target=pipe.write_text, args=(text,), kwargs={"encoding": "utf-8"})
        writer.start()
        code, _, err = run(capsys, "ingest", pipe, "--block-size", "48", "--model", tiny_model_dir, *extra)
        writer.join()
        return code, err

    assert ingest_from_pipe(DOCUMENT)[0] == 0
    code, err = ingest_from_pipe(NEW_VERSION)
    assert code == 2 and "already stored with a different source file" in err
    assert ingest_from_pipe(NEW_VERSION, "--force")[0] == 0
    # The whole new text, not a prefix: the old and new versions share their first 200 characters.
    assert (home / "documents" / "notes" / "text.txt").read_text(encoding="utf-8") == NEW_VERSION.rstrip()


def test_an_identical_ingest_finished_while_this_one_waited_is_kept(capsys, monkeypatch, home, inputs,
                                                                  tiny_model_dir):
    """Two batch jobs `ask --doc notes.txt` on a new file: the second finds it stored when it gets the lock."""
    from contextlib import contextmanager

    from starqa.store.document_store import DocumentStore

    real_lock, others = DocumentStore.lock, []

    @contextmanager
    def lock_after_another_ingest(self, name, **kwargs):
        if not others:  # the other process got the lock first and stores the same file meanwhile
            others.append(name)
            _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
        with real_lock(self, name, **kwargs):
            yield

    monkeypatch.setattr(DocumentStore, "lock", lock_after_another_ingest)
    stored = (home / "documents" / "terms").resolve
    code, out, err = run(capsys, "ingest", inputs / "terms.txt", "--block-size", "48", "--model", tiny_model_dir)
    assert code == 0 and others == ["terms"] and error_lines(err) == []
    assert "was just stored from the same source with the same settings" in err
    assert [p.name for p in (home / "objects").iterdir()] == [stored().name]


def test_the_triton_backend_where_it_cannot_run_is_a_usage_error_before_any_work(capsys, monkeypatch, home, inputs,
                                                                                 tiny_model_dir, tmp_path):
    import starqa.attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (the attention tests set it for this process)
    config = tmp_path / "triton.yaml"
    config.write_text("attention_backend: triton\n", encoding="utf-8")
    ingest = ["ingest", inputs / "terms.txt", "--model", tiny_model_dir, "--device", "cpu", "--config", config]
    code, _, err = run(capsys, *ingest)
    assert code == 2 and error_lines(err) == ["starqa: error: attention backend 'triton' runs on CUDA (or on the CPU "
                                              "under TRITON_INTERPRET=1, for tests), not on cpu; use auto or torch"]
    monkeypatch.setattr(starqa.attention, "triton_available", lambda: False)
    code, _, err = run(capsys, *ingest)
    assert code == 2 and "needs the triton package" in error_lines(err)[0]
    assert not (home / "documents").exists() or run(capsys, "list")[1] == ""


def test_rm_of_a_name_given_twice_removes_it_once(capsys, home, inputs, tiny_model_dir):
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    code, _, err = run(capsys, "rm", "terms", "terms")
    assert code == 0 and error_lines(err) == []
    assert run(capsys, "list")[1] == ""


def test_the_long_document_message_names_both_lengths(capsys, monkeypatch, stocked, inputs, small_window_model):
    monkeypatch.setenv("STARQA_HOME", str(stocked))
    _, _, err = run(capsys, "ingest", inputs / "long.txt", "--model", small_window_model)
    tokens = re.search(r"is ([\d,]+) tokens with the prompt, but the model reads at most 256", err)
    assert tokens and int(tokens.group(1).replace(",", "")) > 256, err


def test_what_the_flags_allow_is_stored(capsys, home, inputs, tiny_model_dir, small_window_model):
    _ingest(capsys, inputs / "locked.pdf", tiny_model_dir, "--password", "s3cret")
    code, out, err = run(capsys, "ingest", inputs / "long.txt", "--model", small_window_model, "--allow-long",
                         "--block-size", "64")
    assert code == 0, err
    code, out, _ = run(capsys, "list", "--json")
    assert sorted(row["name"] for row in json_lines(out)) == ["locked", "long"]


def test_text_that_is_not_utf8_is_decoded_with_replacement_and_said_so(capsys, home, inputs, tiny_model_dir):
    code, out, err = run(capsys, "ingest", inputs / "latin1.txt", "--model", tiny_model_dir)
    assert code == 0, err
    [warning] = [line for line in err.splitlines() if line.startswith("starqa: warning:")]  # one line, unwrapped
    assert "latin1.txt" in warning and "not valid UTF-8" in warning and "replacement characters" in warning
    assert out == ""
    text = next((home / "documents").glob("latin1")).resolve().joinpath("text.txt").read_text(encoding="utf-8")
    assert "\ufffd" in text and "caf\u00e9" in text


def test_debug_shows_the_traceback_and_keeps_the_line_and_exit_code(capsys, monkeypatch, stocked):
    monkeypatch.setenv("STARQA_HOME", str(stocked))
    code, out, err = run(capsys, "info", "term", "--debug")
    assert code == 2 and "Traceback" in err and len(error_lines(err)) == 1 and out == ""
    code, _, err = run(capsys, "info", "term")
    assert code == 2 and "Traceback" not in err


# --------------------------------------------------------------------------------------- store integrity


def test_store_is_private_and_nothing_in_it_is_executed(capsys, home, inputs, tiny_model_dir):
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for path in home.rglob("*"):
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    # Nothing in starqa unpickles or evaluates what it reads.
    for source in (REPO / "starqa").rglob("*.py"):
        code = source.read_text(encoding="utf-8")
        assert not re.search(r"\bimport pickle\b|\bpickle\.load|torch\.load\(|(?<![\w.])(eval|exec)\(", code), source


def test_trust_remote_code_is_off_unless_asked(capsys, monkeypatch, home, inputs, tiny_model_dir):
    import transformers

    seen = []

    class Refusing:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            raise RuntimeError("stop here")

    # The model's forward is starqa's own (no model code runs); the tokenizer is loaded by transformers.
    monkeypatch.setattr(transformers, "AutoTokenizer", Refusing)
    assert run(capsys, "ingest", inputs / "terms.txt", "--model", tiny_model_dir)[0] == 1
    assert run(capsys, "ingest", inputs / "terms.txt", "--model", tiny_model_dir, "--trust-remote-code")[0] == 1
    assert seen == [False, True]


def _block(home: Path, index: int = 1) -> Path:
    return (home / "documents" / "terms").resolve() / "blocks" / f"block_{index:05d}.safetensors"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # in the tensor data, so only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,fragment", [(_truncate, "bytes, expected"), (_flip, "does not match its checksum"),
                                             (Path.unlink, "is missing")], ids=["truncated", "flipped", "deleted"])
def test_damaged_kv_is_never_used(capsys, home, inputs, tiny_model_dir, damage, fragment):
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    answer = _answer(capsys, tiny_model_dir)
    block = _block(home)
    saved, saved_stat = block.read_bytes(), block.stat()
    damage(block)
    before = tree_snapshot(home)
    code, out, err = run(capsys, "ask", "--doc", "terms", QUESTION, "--model", tiny_model_dir, "--max-new-tokens", "6")
    assert code == 1 and out == "", err
    [line] = error_lines(err)
    assert "'terms'" in line and "blocks/block_00001.safetensors" in line and fragment in line
    assert f"starqa ingest {inputs / 'terms.txt'} --name terms --force" in line
    assert tree_snapshot(home) == before
    code, _, err = run(capsys, "verify", "terms")
    assert code == 1 and "blocks/block_00001.safetensors" in err
    block.write_bytes(saved)
    os.utime(block, ns=(saved_stat.st_atime_ns, saved_stat.st_mtime_ns))
    assert run(capsys, "verify", "terms")[0] == 0
    assert _answer(capsys, tiny_model_dir) == answer


@pytest.mark.parametrize("relative,args", [("text.txt", ("--attention", "full")),
                                           ("context_ids.safetensors", ()), ("pages.json", ())],
                         ids=["text-full-attention", "context-ids", "pages"])
def test_damaged_text_ids_and_pages_are_never_used(capsys, home, inputs, tiny_model_dir, relative, args):
    """The files read whole (the text full attention encodes; the ids and pages that give an old document's
    sources) are checked against the manifest too, not only the KV blocks."""
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    folder = (home / "documents" / "terms").resolve()
    if relative != "text.txt":  # ids and pages are read for sources only by a document stored without block pages
        manifest_path = folder / "manifest.json"
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        for block in manifest["blocks"]:
            del block["pages"]
        manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    _flip(folder / relative)
    before = tree_snapshot(home)
    code, out, err = run(capsys, "ask", "--doc", "terms", QUESTION, "--model", tiny_model_dir, "--max-new-tokens", "4",
                         "--json", *args)
    assert code == 1 and out == "", err
    [line] = error_lines(err)
    assert f"'terms' is damaged: {relative} does not match its checksum" in line and "--force" in line
    assert tree_snapshot(home) == before


def test_a_document_stored_with_other_settings_is_refused_by_name(capsys, home, inputs, tiny_model_dir):
    """KV made with another dtype or block size is never used for an answer; the message names the difference."""
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    before = tree_snapshot(home)
    stored_dtype = json.loads(((home / "documents" / "terms").resolve() / "manifest.json").read_text())["dtype"]
    other_dtype = "float32" if stored_dtype == "bfloat16" else "bfloat16"
    for flags, difference in ((("--dtype", other_dtype), "dtype"), (("--block-size", "64"), "block size")):
        code, out, err = run(capsys, "ask", "--doc", "terms", QUESTION, "--model", tiny_model_dir, *flags)
        assert code == 1 and out == "", err
        [line] = error_lines(err)
        assert f"document 'terms' was stored with a different {difference}" in line, line
        assert f"starqa ingest {inputs / 'terms.txt'} --name terms --force" in line
    assert tree_snapshot(home) == before
    answer = _answer(capsys, tiny_model_dir)  # without --block-size the stored sizes are used
    code, out, err = run(capsys, "ask", "--doc", "terms", QUESTION, "--model", tiny_model_dir, "--max-new-tokens", "6")
    assert code == 0 and answer in out, err  # streamed to the stdout of now (was: of import time)


def test_a_change_that_keeps_size_and_mtime_is_caught_by_verify(capsys, home, inputs, tiny_model_dir):
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    block = _block(home, 0)
    saved = block.stat()
    _flip(block)
    os.utime(block, ns=(saved.st_atime_ns, saved.st_mtime_ns))
    code, out, err = run(capsys, "verify", "terms")
    assert code == 1 and out == ""
    assert "blocks/block_00000.safetensors does not match its checksum" in error_lines(err)[0]


def test_a_damaged_manifest_is_reported_and_the_document_can_be_listed_around_replaced_or_removed(
        capsys, home, inputs, tiny_model_dir):
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    _ingest(capsys, inputs / "v2.txt", tiny_model_dir)
    manifest = (home / "documents" / "terms").resolve() / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    code, out, err = run(capsys, "ask", "--doc", "terms", QUESTION, "--model", tiny_model_dir)
    assert code == 1 and out == "" and "'terms' has a missing or damaged manifest" in error_lines(err)[0]
    code, out, err = run(capsys, "list")  # the others are still listed; the damaged one is named on stderr
    assert code == 0 and out.startswith("v2\t") and "'terms' has a missing or damaged manifest" in err
    before = tree_snapshot(home)
    code, _, err = run(capsys, "ingest", inputs / "terms.txt", "--block-size", "48", "--model", tiny_model_dir)
    assert code == 1 and "re-ingest it with --force" in error_lines(err)[0] and tree_snapshot(home) == before
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir, "--force")
    assert _answer(capsys, tiny_model_dir)
    manifest = (home / "documents" / "terms").resolve() / "manifest.json"
    manifest.write_text('{"format": 0}')
    code, _, err = run(capsys, "info", "terms")
    assert code == 1 and "incompatible starqa version" in error_lines(err)[0]
    assert run(capsys, "rm", "terms")[0] == 0
    assert not (home / "documents" / "terms").exists()
    assert [p.name.split(".")[0] for p in (home / "objects").iterdir()] == ["v2"]


def test_ask_passes_ingest_options_for_a_file(capsys, home, inputs, tiny_model_dir):
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    ask = ["ask", "--doc", inputs / "v2.txt", "--name", "terms", QUESTION, "--max-new-tokens", "2",
           "--block-size", "48", "--model", tiny_model_dir]
    code, _, err = run(capsys, *ask)
    assert code == 2 and "pass --force to replace it" in error_lines(err)[0]
    code, out, err = run(capsys, *ask, "--force", "--json")
    assert code == 0, err
    assert json.loads((home / "documents" / "terms" / "manifest.json").read_text())["source"]["path"].endswith("v2.txt")
    code, _, err = run(capsys, "ask", "--doc", "terms", QUESTION, "--force", "--model", tiny_model_dir)
    assert code == 2 and "--force apply when --doc is a file to ingest" in error_lines(err)[0]


def test_a_store_path_with_a_link_or_tilde_is_resolved(tmp_path, monkeypatch):
    from starqa.store.document_store import DocumentStore

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert DocumentStore(tmp_path / "link").root == real.resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert DocumentStore("~/store").root == (tmp_path / "store").resolve()


def test_a_document_replaced_while_read_is_not_called_damaged(capsys, home, inputs, tiny_model_dir):
    from starqa.store.document_store import DocumentStore

    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    store = DocumentStore(home)
    document = store.get("terms")
    _ingest(capsys, inputs / "v2.txt", tiny_model_dir, "--name", "terms", "--force")  # another process, meanwhile
    with pytest.raises(Exception, match="was replaced or removed by another starqa process while it was being read"):
        list(store.load_blocks(document, [0]))


@pytest.mark.parametrize("attention", ["star", "full"])
def test_ask_reads_the_new_version_when_the_name_is_replaced_while_it_reads(capsys, monkeypatch, home, inputs,
                                                                          tiny_model_dir, attention):
    from starqa.store.document_store import DocumentStore, StoredDocument

    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    _ingest(capsys, inputs / "v2.txt", tiny_model_dir, "--name", "v2")
    v2_tokens = json.loads(run(capsys, "ask", "--doc", "v2", QUESTION, "--json", "--max-new-tokens", "1",
                               "--model", tiny_model_dir)[1])["context_tokens"]
    replaced = []
    read = DocumentStore.load_blocks if attention == "star" else StoredDocument.text

    def read_while_replaced(self, *args, **kwargs):  # another process's `ingest --force` lands mid-read, once
        if not replaced:
            replaced.append(True)
            _ingest(capsys, inputs / "v2.txt", tiny_model_dir, "--name", "terms", "--force")
            capsys.readouterr()
        return read(self, *args, **kwargs)

    monkeypatch.setattr(DocumentStore if attention == "star" else StoredDocument,
                        "load_blocks" if attention == "star" else "text", read_while_replaced)
    code, out, err = run(capsys, "ask", "--doc", "terms", QUESTION, "--json", "--max-new-tokens", "1",
                         "--attention", attention, "--model", tiny_model_dir)
    assert code == 0 and replaced, err
    assert json.loads(out)["context_tokens"] == v2_tokens  # answered from the version that replaced it


def test_ask_gives_up_with_one_line_when_the_name_keeps_being_replaced(capsys, monkeypatch, home, inputs,
                                                                       tiny_model_dir):
    from starqa.store.document_store import DocumentStore

    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    read, replacements = DocumentStore.load_blocks, []

    def read_while_replaced(self, *args, **kwargs):
        replacements.append(True)
        _ingest(capsys, inputs / ("v2.txt" if len(replacements) % 2 else "terms.txt"), tiny_model_dir,
                "--name", "terms", "--force")
        capsys.readouterr()
        return read(self, *args, **kwargs)

    monkeypatch.setattr(DocumentStore, "load_blocks", read_while_replaced)
    code, out, err = run(capsys, "ask", "--doc", "terms", QUESTION, "--model", tiny_model_dir)
    assert code == 1 and out == "" and len(replacements) == 3
    assert error_lines(err) == ["starqa: error: document 'terms' was replaced or removed by another starqa process "
                                "while it was being read; try again"]
    assert "Traceback" not in err


def test_an_unexpected_error_in_one_process_keeps_its_own_type():
    from starqa.engine.distributed import Ranks, share_outcome

    with pytest.raises(ZeroDivisionError):
        share_outcome(Ranks(), lambda: 1 / 0)


@pytest.mark.parametrize("failure", [
    lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    lambda: __import__("safetensors").SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"),
], ids=["OSError", "SafetensorError"])
def test_a_full_disk_fails_cleanly_and_leaves_the_store_unchanged(capsys, monkeypatch, home, inputs,
                                                                  tiny_model_dir, failure):
    import starqa.store.document_store

    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    before = tree_snapshot(home)
    real_save_file, calls = starqa.store.document_store.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # context ids, then the first block Phase 1 encodes (the unchanged ones were taken
            # over from the stored version: linked, not written): the disk is full
            Path(path).write_bytes(b"partial")
            raise failure()
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(starqa.store.document_store, "save_file", save_file)
    code, out, err = run(capsys, "ingest", inputs / "v2.txt", "--name", "terms", "--force", "--block-size", "48",
                         "--model", tiny_model_dir)
    assert code == 1 and out == "" and "Traceback" not in err
    [line] = error_lines(err)
    assert "no space left on device while writing document 'terms'" in line and "nothing was stored" in line
    assert len(calls) == 2
    assert tree_snapshot(home) == before
    assert not list((home / "objects").glob(".tmp-*"))


def test_rm_removes_a_document_completely(capsys, home, inputs, tiny_model_dir):
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    before = tree_snapshot(home)
    _ingest(capsys, inputs / "v2.txt", tiny_model_dir)
    assert (home / "documents" / "v2").exists()
    code, out, err = run(capsys, "rm", "v2")
    assert code == 0 and out == "" and "removed 'v2'" in err
    assert tree_snapshot(home) == before
    assert not [p for p in (home / "objects").iterdir() if p.name.startswith(("v2", ".tmp-v2"))]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _leftovers(home: Path, pid: int) -> None:
    """What killed writers leave: a staging folder, an object nothing links to, a temporary and a dangling link,
    and a half-converted model."""
    staging = home / "objects" / f".tmp-ghost.0123456789ab.{pid}"
    (staging / "blocks").mkdir(parents=True)
    (staging / "blocks" / "block_00000.safetensors").write_bytes(b"x" * 1000)
    orphan = home / "objects" / "ghost.abcdef012345"
    orphan.mkdir()
    (orphan / "manifest.json").write_bytes(b"{}" * 12)
    os.symlink("../objects/ghost.abcdef012345", home / "documents" / ".link-ghost.0badf00d")
    os.symlink("../objects/gone.abcdef012345", home / "documents" / "gone")
    converting = home / "models" / ".tmp-smollm2-135m-0123456789abcdef-0badf00d"
    converting.mkdir(parents=True)
    (converting / "model.safetensors").write_bytes(b"w" * 1024)


def test_gc_and_the_next_ingest_remove_leftovers_but_not_a_live_writers_work(capsys, home, inputs, tiny_model_dir):
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    clean = tree_snapshot(home)
    _leftovers(home, _dead_pid())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = home / "objects" / f".tmp-busy.0123456789ab.{sleeper.pid}"
        live.mkdir()
        (live / "text.txt").write_text("in progress")
        code, out, err = run(capsys, "gc")
        assert code == 0 and out == ""
        assert "removed 5 leftover item(s), freed 2.0 KiB" in err, err
        assert live.is_dir()
        assert {k: v for k, v in tree_snapshot(home).items() if ".tmp-busy" not in k} == clean
    finally:
        sleeper.kill()
        sleeper.wait()
    _leftovers(home, _dead_pid())
    _ingest(capsys, inputs / "v2.txt", tiny_model_dir)  # any ingest cleans what dead writers left
    assert sorted(p.name for p in (home / "documents").iterdir()) == ["terms", "v2"]
    assert sorted(p.name.split(".")[0] for p in (home / "objects").iterdir()) == ["terms", "v2"]
    assert run(capsys, "gc")[2].startswith("removed 0 leftover item(s)")


# ----------------------------------------------------------------------------- crashes and concurrent use


def _spawn(home: Path, *args: str, env: dict | None = None, stderr=subprocess.PIPE) -> subprocess.Popen:
    environment = dict(os.environ, STARQA_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    environment.pop("NO_COLOR", None)
    return subprocess.Popen([sys.executable, "-m", "starqa", *map(str, args)], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"starqa exited ({process.returncode}) before {what}: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _staged_blocks(home: Path) -> int:
    return sum(1 for _ in (home / "objects").glob(".tmp-*/blocks/*.safetensors"))


@pytest.mark.slow
def test_sigkill_mid_ingest_or_before_the_link_swap_leaves_the_previous_version(capsys, home, inputs,
                                                                                tiny_model_dir):
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    answer = _answer(capsys, tiny_model_dir)
    previous = (home / "documents" / "terms").resolve()
    before = tree_snapshot(home)
    replace = ("ingest", inputs / "edited.txt", "--name", "terms", "--force", "--block-size", "48",
               "--model", tiny_model_dir)

    # 1. Killed mid-ingest: the edited version takes the 4 unchanged blocks of terms.txt over (hard links to the
    #    previous version's files, so this also checks that they leave it whole) and has encoded the first of its 3
    #    changed blocks; the other two are not written yet.
    writer = _spawn(home, *replace, env={"STARQA_TEST_PAUSE_AT": "after-block:5"})
    _wait_for(lambda: _staged_blocks(home) >= 5, writer, "four blocks taken over and one encoded")
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert (home / "documents" / "terms").resolve() == previous
    assert len(list((home / "objects").glob(".tmp-terms.*"))) == 1  # the leftover of the killed writer
    assert {k: v for k, v in tree_snapshot(home).items() if ".tmp-" not in k} == before
    assert run(capsys, "verify", "terms")[0] == 0
    assert _answer(capsys, tiny_model_dir) == answer

    # 2. Killed after the new object was renamed into place, before the link swap. This run first removed the
    #    leftover of the first kill.
    writer = _spawn(home, *replace, env={"STARQA_TEST_PAUSE_AT": "before-link-swap"})
    _wait_for(lambda: len(list((home / "objects").glob("terms.*"))) == 2, writer, "the new object folder")
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not list((home / "objects").glob(".tmp-*"))
    assert (home / "documents" / "terms").resolve() == previous
    assert _answer(capsys, tiny_model_dir) == answer
    code, _, err = run(capsys, "gc")
    assert code == 0 and re.search(r"removed 1 leftover item\(s\), freed [\d.]+ KiB", err), err
    assert tree_snapshot(home) == before

    # 3. The next ingest completes and replaces the document.
    _ingest(capsys, inputs / "edited.txt", tiny_model_dir, "--name", "terms", "--force")
    assert [p.name for p in (home / "objects").iterdir()] == [(home / "documents" / "terms").resolve().name]
    current = (home / "documents" / "terms").resolve()
    assert current.joinpath("text.txt").read_text().endswith("seven years.")
    manifest = json.loads(current.joinpath("manifest.json").read_text())
    assert (manifest["blocks_reused"], manifest["blocks_encoded"]) == (4, 3)  # what the pause point above assumes


@pytest.mark.slow
def test_two_ingests_of_one_name_at_once_never_both_write(tmp_path, inputs, tiny_model_dir):
    home = tmp_path / "home"
    resume = tmp_path / "resume"
    ingest = ("ingest", inputs / "terms.txt", "--block-size", "48", "--model", tiny_model_dir)
    first = _spawn(home, *ingest, env={"STARQA_TEST_PAUSE_AT": "after-block:1", "STARQA_TEST_RESUME_FILE": str(resume)})
    try:
        _wait_for(lambda: _staged_blocks(home) >= 1, first, "the first writer's block")
        second_log = tmp_path / "second.err"
        with open(second_log, "w") as log:  # another version under the same name
            second = _spawn(home, "ingest", inputs / "v2.txt", "--name", "terms", *ingest[2:], stderr=log)
            _wait_for(lambda: "waiting for it" in second_log.read_text(), second, "the second writer to wait")
        staging = list((home / "objects").glob(".tmp-*"))
        assert len(staging) == 1 and staging[0].name.endswith(f".{first.pid}")  # only the first one writes
        resume.touch()
        assert first.wait(timeout=180) == 0, first.communicate()
        assert second.wait(timeout=180) == 2
    finally:
        for process in (first, locals().get("second")):
            if process is not None and process.poll() is None:
                process.kill()
    [line] = error_lines(second_log.read_text())
    assert "document 'terms' was just stored by another starqa process; pass --force to replace it" in line
    assert [p.name for p in (home / "objects").iterdir()] == [(home / "documents" / "terms").resolve().name]
    assert starqa("verify", "terms", home=home).returncode == 0


# -------------------------------------------------------------------------------------------- output discipline


def _colours(text: str) -> list[str]:
    """SGR escape sequences that set a colour (not bold or italic, which NO_COLOR keeps)."""
    found = []
    for params in re.findall(r"\x1b\[([0-9;]*)m", text):
        codes = {int(code) for code in params.split(";") if code}
        if codes & (set(range(30, 39)) | set(range(40, 49)) | set(range(90, 98)) | set(range(100, 108))):
            found.append(params)
    return found


@pytest.mark.slow
def test_stdout_carries_only_answers_and_stderr_the_rest(capsys, home, inputs, tiny_model_dir):
    _ingest(capsys, inputs / "terms.txt", tiny_model_dir)
    result = starqa("ask", "--doc", "terms", "--questions", inputs / "questions.txt", "--json",
                    "--max-new-tokens", "6", "--model", tiny_model_dir, home=home)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]  # every line of stdout is one JSON object
    assert [row["question"] for row in rows] == [QUESTION, "When are the reports delivered?"]
    assert "Phase 2 prefill" in result.stderr  # the timing tables go to stderr
    assert "\x1b[" not in result.stderr + result.stdout and "\u2501" not in result.stderr  # no bars off a terminal
    plain = starqa("ask", "--doc", "terms", QUESTION, "--max-new-tokens", "6", "--model", tiny_model_dir, "--quiet",
                   home=home)
    assert plain.returncode == 0 and plain.stderr == ""
    lines = plain.stdout.splitlines()
    # Under the answer: its evidence quotes, whether it is grounded in them, its sources (starqa.evidence).
    grounded = next(i for i, line in enumerate(lines) if line.startswith("Grounded: "))
    quotes = next((i for i, line in enumerate(lines) if line.startswith("Evidence: ")), grounded)
    assert "\n".join(lines[:quotes]).strip() == rows[0]["answer"]
    assert all(line.startswith("Sources: ") for line in lines[grounded + 1:])


@pytest.mark.slow
def test_off_a_terminal_every_message_is_one_plain_line(tmp_path, tiny_model_dir):
    # A batch job's log: stderr is not a terminal. A long warning and the tables' titles with a long name must each
    # be one line, unpadded, with no escape codes, and the name printed as it is (":memo:" is a Rich emoji code).
    name = "board-minutes:memo:-quarterly-review-of-the-supplier-agreement-with-every-annex-2025"
    source = tmp_path / ("minutes-of-the-board-meeting-" + "x" * 60 + ".txt")
    source.write_bytes(DOCUMENT.encode("cp1252") + b"na\xefve clause.\n")  # Windows-1252: a long warning
    result = starqa("ask", "--doc", source, "--name", name, QUESTION, "--block-size", "48", "--max-new-tokens", "4",
                    "--model", tiny_model_dir, home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if line != line.rstrip()] == []
    assert "\x1b" not in result.stderr
    [warning] = [line for line in lines if line.startswith("starqa: warning:")]
    assert str(source) in warning and warning.endswith("save it as UTF-8 and ingest it again")
    assert f"ingested '{name}'" in lines
    title = re.compile(rf"star attention over '{re.escape(name)}' \([\d,]+ context tokens, 1 question\)")
    assert [line for line in lines if title.fullmatch(line)], result.stderr


def test_every_command_has_quiet_and_debug():
    import typer

    def leaves(name, command):  # a group's (audit, keys) subcommands are what runs
        if hasattr(command, "commands"):
            for sub_name, sub_command in command.commands.items():
                yield from leaves(f"{name} {sub_name}", sub_command)
        else:
            yield name, command

    checked = []
    for name, command in typer.main.get_command(cli.app).commands.items():
        for leaf_name, leaf in leaves(name, command):
            options = {option for parameter in leaf.params for option in getattr(parameter, "opts", [])}
            assert {"--quiet", "--debug"} <= options, leaf_name
            checked.append(leaf_name)
    assert {"ask", "keys add", "audit verify"} <= set(checked)


def test_quiet_leaves_stderr_empty(capsys, home, inputs, tiny_model_dir):
    code, out, err = run(capsys, "ingest", inputs / "terms.txt", "--model", tiny_model_dir, "--quiet")
    assert (code, out, err) == (0, "", "")
    code, out, err = run(capsys, "list", "--quiet")
    assert code == 0 and out.startswith("terms\t") and err == ""


@pytest.mark.slow
def test_no_color_is_honoured_even_on_a_terminal(tmp_path, inputs, tiny_model_dir):
    ingest = ("ingest", inputs / "latin1.txt", "--model", tiny_model_dir)
    coloured = starqa(*ingest, home=tmp_path / "a", env={"FORCE_COLOR": "1"})
    assert coloured.returncode == 0 and "not valid UTF-8" in coloured.stderr
    assert _colours(coloured.stderr)  # the warning is yellow on a terminal ...
    plain = starqa(*ingest, home=tmp_path / "b", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert plain.returncode == 0 and "not valid UTF-8" in plain.stderr
    assert not _colours(plain.stderr)  # ... and not with NO_COLOR
    assert coloured.stdout == plain.stdout == ""


def test_a_sliding_window_model_is_refused_beyond_its_window(capsys, home, inputs, tmp_path, bundled_tokenizer):
    # Within the window a sliding-window layer attends like a full one; beyond it Star Attention would not compute
    # what the model computes, so such a document is refused before Phase 1.
    from starqa.model.resolve import model_sliding_window

    directory = tmp_path / "tiny-mistral-window"
    tiny_model("mistral", sliding_window=64).save_pretrained(directory)
    bundled_tokenizer.save_pretrained(directory)
    before = tree_snapshot(home)
    code, out, err = run(capsys, "ingest", inputs / "terms.txt", "--model", directory)
    assert code == 2 and out == "" and "attends to only the last 64 tokens" in error_lines(err)[0]
    assert tree_snapshot(home) == before
    assert model_sliding_window(tiny_model("qwen2").config) is None
    assert model_sliding_window(tiny_model("qwen2", use_sliding_window=True, sliding_window=64,
                                           max_window_layers=0).config) == 64


def test_a_gguf_of_another_architecture_is_refused_before_it_is_converted(capsys, home, inputs, tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), arch="phi3")
    for add, value in ((writer.add_context_length, 128), (writer.add_embedding_length, 16),
                       (writer.add_block_count, 1), (writer.add_feed_forward_length, 32),
                       (writer.add_head_count, 2), (writer.add_head_count_kv, 2), (writer.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(64))
    for model, fragment in ((path, "model architecture 'phi3' is not supported"),
                             (tmp_path / "broken.gguf", "cannot read broken.gguf as a model")):
        code, out, err = run(capsys, "ingest", inputs / "terms.txt", "--model", model)
        assert code == 2 and out == "" and "Traceback" not in err, err
        assert fragment in error_lines(err)[0]
    assert not [p for p in (home / "models").rglob("*") if p.suffix == ".safetensors"]  # nothing was converted
