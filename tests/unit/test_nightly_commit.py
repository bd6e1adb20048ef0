"""The nightly run commits to DVC only stages whose outside inputs did not change while it ran.

Seen in the production demo: verdicts of `adps review` landed in data/incoming while a nightly run (started
early by a drift event) was training; its `dvc commit` recorded the import folder as it was at the end,
so 27 of 29 reviewed images were marked imported and never were.
"""

from __future__ import annotations

import logging

from flows.pipeline import committable, inputs_digest
from tests.conftest import tiny_params, write_params

EXECUTED = ["prepare", "validate@washer", "distill@washer"]


def test_images_arriving_during_a_run_leave_prepare_stale(tmp_path, caplog):
    params_file = write_params(tmp_path)
    params = tiny_params().at(tmp_path)
    incoming = tmp_path / "data/incoming/washer/anomalous"
    incoming.mkdir(parents=True)
    (incoming / "a.png").write_bytes(b"1")
    before = inputs_digest(params, str(params_file))
    assert committable(EXECUTED, before, inputs_digest(params, str(params_file)), logging.getLogger()) == EXECUTED

    (incoming / "reviewed-b.png").write_bytes(b"2")  # a verdict during the run
    after = inputs_digest(params, str(params_file))
    assert committable(EXECUTED, before, after, logging.getLogger()) == ["validate@washer", "distill@washer"]
    assert "new images arrived during the run" in caplog.text

    params_file.write_text(params_file.read_text() + "\n# edited\n")
    assert committable(EXECUTED, before, inputs_digest(params, str(params_file)), logging.getLogger()) == []
