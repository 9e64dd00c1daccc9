"""Resuming never runs code planted in a checkpoint folder.

A real DeepSpeed engine (ZeRO-2 on CPU, one process) writes a signed checkpoint; then, one file at
a time, every file a resume reads is replaced by a torch file whose loading creates a marker file (the
test first shows that ``torch.load`` does run it). Each resume must refuse the checkpoint with an
error naming the file, and the marker must never appear. A file added to the folder, a forged
digest, a checkpoint signed with another key or moved to another step, a folder replaced by a
link and a file replaced by a pipe are refused too; the untouched checkpoint restores
the weights and the RNG state exactly. The engine runs in a subprocess: DeepSpeed's communication
setup is once per process and must not leak into the test session's Ray driver.
"""

from __future__ import annotations

import textwrap

import pytest
from fixtures_train import run_single_process_script

SCRIPT = textwrap.dedent(
    """
    import json, os, shutil, sys
    from pathlib import Path
    import torch
    from perceiver_core.config import get_preset
    from perceiver_core.model import PerceiverForMaskedLM
    from pipelines.signing import IntegrityError
    from pipelines.train.checkpoint import Checkpointer, TrainState, checkpoint_name
    from pipelines.train.engine import create_engine, deepspeed_config
    from perceiver_core.optim import OptimizerConfig

    work, marker = Path(sys.argv[1]), Path(sys.argv[2])

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    def engine():
        torch.manual_seed(0)
        model = PerceiverForMaskedLM(get_preset("tiny", attention_probs_dropout_prob=0.0))
        cfg = deepspeed_config(micro_batch_size=2, grad_accum_steps=1, world_size=1,
                               zero_stage=2, precision="fp32", grad_clip=1.0)
        return create_engine(model, cfg, OptimizerConfig(name="adamw", lr=1e-2), 10)

    class Local:  # what ray.train.get_checkpoint() returns, for a local folder
        def __init__(self, path):
            self.path = str(path)
        def as_directory(self):
            import contextlib
            return contextlib.nullcontext(self.path)

    trained = engine()
    ids = torch.randint(6, 262, (2, 32))
    out = trained(ids, labels=ids)
    trained.backward(out.loss)
    trained.step()
    state = TrainState(3, "run-id", "hash", 1, {"evals": 1}, {"position": {"watermark": 6}})
    original = work / checkpoint_name(3)
    original.mkdir()
    Checkpointer(trained, 0, "run", b"key-one").write(original, state)
    draw = torch.rand(1).item()  # the RNG state saved above, drawn once

    fresh = engine()
    result = {}
    restored = Checkpointer(fresh, 0, "run", b"key-one").restore(Local(original))
    result["restored_state"] = restored == state
    result["rng_restored"] = torch.rand(1).item() == draw
    result["weights_equal"] = all(
        torch.equal(a, b)
        for a, b in zip(fresh.module.state_dict().values(), trained.module.state_dict().values())
    )

    def attempt(folder, key=b"key-one"):
        try:
            Checkpointer(fresh, 0, "run", key).restore(Local(folder))
        except IntegrityError as error:
            return str(error)
        return None

    files = sorted(str(p.relative_to(original)) for p in original.rglob("*") if p.is_file())
    result["files"] = files
    result["planted"] = {}
    for relpath in files:
        copy = work / "planted" / checkpoint_name(3)
        shutil.rmtree(copy.parent, ignore_errors=True)
        shutil.copytree(original, copy)
        torch.save({"module": Payload()}, copy / relpath)
        result["planted"][relpath] = [attempt(copy), marker.exists()]

    extra = work / "extra" / checkpoint_name(3)
    shutil.copytree(original, extra)
    torch.save({"x": Payload()}, extra / "engine" / "step_00000003" / "extra.pt")
    result["extra"] = attempt(extra)
    forged = work / "forged" / checkpoint_name(3)
    shutil.copytree(original, forged)
    target = forged / "engine" / "step_00000003" / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload()}, target)
    digests = json.loads((forged / "integrity" / "rank_00000.json").read_text())
    digests[str(target.relative_to(forged))] = "0" * 64
    (forged / "integrity" / "rank_00000.json").write_text(json.dumps(digests))
    result["forged"] = attempt(forged)
    result["other_key"] = attempt(original, b"key-two")
    renamed = work / "moved" / checkpoint_name(4)  # the same files as another checkpoint
    shutil.copytree(original, renamed)
    result["moved"] = attempt(renamed)
    linked = work / "linked" / checkpoint_name(3)  # a folder swapped for a link to another
    shutil.copytree(original, linked)
    outside = work / "outside"
    shutil.copytree(original / "engine", outside)
    torch.save({"module": Payload()}, outside / "step_00000003" / "mp_rank_00_model_states.pt")
    shutil.rmtree(linked / "engine")
    (linked / "engine").symlink_to(outside, target_is_directory=True)
    result["linked"] = attempt(linked)
    piped = work / "piped" / checkpoint_name(3)  # opening a pipe would block the resume
    shutil.copytree(original, piped)
    (piped / "state.json").unlink()
    os.mkfifo(piped / "state.json")
    result["fifo"] = attempt(piped)
    result["marker_before_control"] = marker.exists()
    torch.load(target, weights_only=False)  # the control: the payload does run when unpickled
    result["marker_after_control"] = marker.exists()
    print("RESULT" + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("integrity")
    return run_single_process_script(SCRIPT, str(work), str(work / "payload-ran"))


@pytest.mark.slow
def test_a_signed_checkpoint_restores_exactly(outcome: dict) -> None:
    assert outcome["restored_state"] and outcome["weights_equal"] and outcome["rng_restored"]
    files = outcome["files"]
    assert "state.json" in files and "rng/rank_00000.json" in files
    assert any(f.startswith("engine/step_00000003/") and f.endswith(".pt") for f in files)


@pytest.mark.slow
def test_a_payload_in_any_file_is_refused_naming_it_and_never_runs(outcome: dict) -> None:
    planted = outcome["planted"]
    read_on_resume = [f for f in outcome["files"] if not f.startswith("integrity/")]
    assert sorted(planted) == sorted(outcome["files"]) and read_on_resume
    for relpath, (error, ran) in planted.items():
        assert not ran, relpath
        if relpath.startswith("integrity/"):  # a replaced digest file: unreadable digests
            assert error is not None and relpath in error
        else:
            assert error is not None and f"{relpath}: changed since it was written" in error
            assert "may be malicious and nothing was loaded" in error
    assert "\n" not in "".join(e for e, _ in planted.values())  # one line each
    assert "engine/step_00000003/extra.pt" in outcome["extra"]
    assert "mp_rank_00_model_states.pt" in outcome["forged"]
    assert "PERCEIVER_CHECKPOINT_KEY" in outcome["other_key"]
    assert outcome["moved"] is not None  # signed for checkpoint 3, not for checkpoint 4
    assert "engine: not a regular file or folder (a link" in outcome["linked"]
    assert "state.json: not a regular file or folder" in outcome["fifo"]
    # The payload is real: unchecked, torch.load runs it. Nothing above did.
    assert not outcome["marker_before_control"] and outcome["marker_after_control"]
