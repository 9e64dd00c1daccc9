"""One 200 MB document goes through the index pass and the stream in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np

from pipelines.data import (
    PretrainDataConfig,
    SourceConfig,
    SplitConfig,
    build_index_local,
    local_crops,
)

DOC_BYTES = 200_000_000
# pack_documents itself peaks at about 7x its input (ids, a scatter mask, temporaries), the bound
# that matters; reading and masking add little on top because they work in blocks.
MAX_PEAK_MULTIPLE = 8.0


def test_a_200mb_document_streams_with_bounded_memory(tmp_path):
    words = np.array([b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta"])
    block = b" ".join(words[np.random.default_rng(0).integers(0, 6, 200_000)])
    text = (block * (DOC_BYTES // len(block) + 1))[:DOC_BYTES]
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"text": "' + text + b'"}\n{"text": "and a small one"}\n')
    del text, block
    cfg = PretrainDataConfig(
        sources=[SourceConfig(name="big", path=str(path))],
        split=SplitConfig(validation_fraction=0.0),
    )

    tracemalloc.start()
    try:
        index = build_index_local(cfg)
        crops = tokens = masked = 0
        for block in local_crops(cfg, index):
            crops += len(block["length"])
            tokens += int(block["length"].sum(dtype=np.int64))
            masked += int(block["masked"].sum(dtype=np.int64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    total = DOC_BYTES + len(b"and a small one")
    assert tokens == total and crops == -(-total // 2048)
    assert 0.1 < masked / tokens < 0.2
    assert peak < MAX_PEAK_MULTIPLE * DOC_BYTES, f"peak {peak / DOC_BYTES:.1f}x the document"
