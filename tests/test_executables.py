"""The pipeline's executable cache: programs kept across processes as jax.export artifacts (sample.py's second run
neither traces nor compiles: tests/test_sample_cli.py measures it end to end)."""
import contextlib
import logging

import numpy as np

from sdjax.pipeline import executables


def test_kept_programs_skip_tracing_and_survive_a_bad_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(executables, "_artifact_dir", lambda: str(tmp_path))
    traced = []

    def fn(x, *, k):
        traced.append(k)  # runs only while tracing
        return x * k + 1

    args, want = (np.arange(3, dtype=np.float32),), np.arange(3) * 2.0 + 1
    get = lambda cache: cache.get("f", fn, args, {"k": 2.0}, (), contextlib.nullcontext, {})  # noqa: E731
    np.testing.assert_array_equal(get(executables.ExecutableCache("model a"))(*args), want)
    assert traced == [2.0] and len(list(tmp_path.glob("f-*.jaxexport"))) == 1
    # another process's cache (a fresh one) loads the program: fn is not traced again
    np.testing.assert_array_equal(get(executables.ExecutableCache("model a"))(*args), want)
    assert traced == [2.0]
    # another model's identity is another program
    get(executables.ExecutableCache("model b"))
    assert traced == [2.0, 2.0] and len(list(tmp_path.glob("f-*.jaxexport"))) == 2
    # a damaged file is made anew, with a warning
    for path in tmp_path.glob("f-*.jaxexport"):
        path.write_bytes(b"not a program")
    with caplog.at_level(logging.WARNING, logger="sdjax"):
        np.testing.assert_array_equal(get(executables.ExecutableCache("model a"))(*args), want)
    assert "could not be used" in caplog.text and traced == [2.0, 2.0, 2.0]
    np.testing.assert_array_equal(get(executables.ExecutableCache("model a"))(*args), want)
    assert traced == [2.0, 2.0, 2.0]
