"""The scheduler's multi-step decode: how many tokens one call runs for the running sequences."""

from __future__ import annotations

from jaxrs import SamplingParams
from jaxrs.engine.block_manager import BlockManager
from jaxrs.engine.scheduler import Scheduler
from jaxrs.engine.sequence import Sequence


def decoding(scheduler: Scheduler, left: int, params: SamplingParams | None = None) -> Sequence:
    """A running sequence past its prompt with `left` tokens still to generate (of 32)."""
    params = params or SamplingParams(max_tokens=32)
    seq = Sequence(f"r{len(scheduler.running)}", 0, list(range(10)), params, 0, None)
    scheduler.add(seq)
    scheduler.schedule()  # admits and prefills the prompt
    seq.output_ids = [1] * (params.max_tokens - left)
    seq.num_computed = seq.num_tokens - 1
    return seq


def scheduler() -> Scheduler:
    blocks = BlockManager(64, 16, prefix_caching=False)
    return Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64, max_decode_steps=8, max_model_len=512)


def test_a_call_runs_max_decode_steps_when_every_sequence_can_use_them() -> None:
    s = scheduler()
    decoding(s, 20)
    decoding(s, 9)
    assert s.schedule().decode_steps == 8


def test_the_last_tokens_of_a_request_take_one_call() -> None:
    """Fewer than `max_decode_steps` left: one call of that many, not one call each."""
    s = scheduler()
    decoding(s, 20)
    decoding(s, 5)
    step = s.schedule()
    assert len(step.decode) == 2 and step.decode_steps == 5
    s = scheduler()
    decoding(s, 1)
    assert s.schedule().decode_steps == 1


def test_sequences_that_need_the_host_each_token_decode_one_at_a_time() -> None:
    s = scheduler()
    decoding(s, 20)
    decoding(s, 20, SamplingParams(max_tokens=32, repetition_penalty=1.2))
    assert s.schedule().decode_steps == 1
