"""The inspect view: masked words marked in decoded crops, and the command end to end."""

from __future__ import annotations

import numpy as np
import pytest

from jobs import inspect_data
from perceiver_core.masking import IGNORE_INDEX
from perceiver_core.tokenizer import MASK
from pipelines.data.inspect import render_crop


def test_render_marks_masked_words_with_their_original_text():
    text = b"hello brave new world"
    ids = np.frombuffer(text, np.uint8).astype(np.uint16) + 6
    labels = np.full(len(ids), IGNORE_INDEX, np.int16)
    span = slice(5, 11)  # " brave" with its leading space
    labels[span] = ids[span]
    ids[span] = MASK
    padded_ids = np.r_[ids, np.zeros(4, np.uint16)]
    padded_labels = np.r_[labels, np.full(4, IGNORE_INDEX, np.int16)]
    assert render_crop(padded_ids, padded_labels, len(text)) == "hello⟦ brave⟧ new world"


@pytest.mark.usefixtures("ray_session")
def test_inspect_command_prints_crops_and_counters(shared_data, capsys):
    code = inspect_data.main(
        [
            "--config",
            "pipelines/data/configs/shared_data.yaml",
            "--set",
            f"data_dir={shared_data}",
            "--crops",
            "2",
            "--sample",
            "300",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("--- position ") == 2 and "⟦" in out and "⟧" in out
    assert '"masked_fraction"' in out and '"padding_fraction"' in out and '"skipped_docs"' in out
    assert '"crops": 300' in out
