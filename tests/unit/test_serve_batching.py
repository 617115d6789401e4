"""The batching engine's decode loop (:mod:`tunelab.serve.batching`) against one ``generate`` per prompt.

Each row of a batch must come out exactly as the same request served alone by ``generate_stream`` (transformers'
``generate`` on one unpadded prompt): the same greedy tokens, text, token count and finish reason -- while rows
join mid-way, finish early, stop at their own stop strings or are cancelled.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.evaluate.generate import LoadedModel, load_for_eval, stop_token_ids
from tunelab.serve.batching import DecodeBatch, Row, row_generator
from tunelab.serve.generation import Completion, SamplingOptions, TokenStream, generate_stream

PROMPTS = ["What is 3 plus 4? 计算 5 加 6", "hi", "这款运动鞋还有货吗？", "Add two blue hoodies in size M to my cart."]


@pytest.fixture(scope="module")
def loaded(tiny_model: Path) -> LoadedModel:
    return load_for_eval(str(tiny_model), dtype="fp32")


class Request:
    """One row and what it reported: its text pieces and its completion."""

    def __init__(self, loaded: LoadedModel, text: str, **options: Any) -> None:
        self.loaded = loaded
        self.prompt = loaded.tokenizer.encode(text)
        self.eos_ids = options.pop("eos_ids", None) or stop_token_ids(loaded)
        self.options = SamplingOptions(**{"max_new_tokens": 10, "temperature": 0.0, **options})
        self.cancel = threading.Event()
        self.pieces: list[str] = []
        self.done: list[tuple[Completion | None, BaseException | None]] = []
        stream = TokenStream(loaded.tokenizer, eos_ids=self.eos_ids, stops=self.options.stop,
                             max_new_tokens=self.options.max_new_tokens, cancel=self.cancel,
                             on_text=self.pieces.append)
        generator = row_generator(self.options.seed, torch.device("cpu")) if self.options.temperature else None
        self.row = Row(self.prompt, self.options, stream, tuple(self.eos_ids),
                       on_done=lambda completion, error: self.done.append((completion, error)), generator=generator)

    @property
    def completion(self) -> Completion:
        assert len(self.done) == 1 and self.done[0][1] is None, self.done
        completion = self.done[0][0]
        assert completion is not None and "".join(self.pieces) == completion.text
        return completion

    def alone(self) -> Completion:
        """The same request through the one-request path: ``generate`` on the unpadded prompt."""
        return generate_stream(self.loaded.model, self.loaded.tokenizer, self.prompt, self.options,
                               eos_ids=self.eos_ids, stops=self.options.stop)


def decode(batch: DecodeBatch, joins: dict[int, list[Request]], max_steps: int = 100) -> int:
    """Step ``batch`` until it is empty, adding ``joins[k]`` before step k; returns the most rows seen at once."""
    most = 0
    for step in range(max_steps):
        if joins.get(step):
            batch.add([r.row for r in joins[step]])
        most = max(most, len(batch.rows))
        if not batch.rows and step > max(joins):
            return most
        batch.step()
    raise AssertionError("the batch never emptied")


@pytest.fixture
def logits_seen(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[torch.Tensor]]:
    """The logits each row's tokens were chosen from, by ``id(row)``."""
    from tunelab.serve import batching

    seen: dict[int, list[torch.Tensor]] = {}
    choose = batching.choose_token
    monkeypatch.setattr(batching, "choose_token",
                        lambda logits, row: seen.setdefault(id(row), []).append(logits) or choose(logits, row))
    return seen


def test_batched_greedy_equals_each_prompt_alone(loaded, logits_seen):
    requests = [Request(loaded, text, max_new_tokens=8 + i) for i, text in enumerate(PROMPTS)]
    most = decode(DecodeBatch(loaded.model), {0: requests[:2], 3: requests[2:]})  # two join a running batch
    assert most == 4
    for request in requests:
        assert request.completion == request.alone(), request.prompt
        # Stricter than the tokens: every step's logits are those of a forward pass over the row alone.
        generated = request.row.stream.detokenizer.ids
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([request.prompt + generated])).logits[0]
        expected = logits[len(request.prompt) - 1 : -1]
        assert torch.allclose(torch.stack(logits_seen[id(request.row)]), expected, atol=1e-4), request.prompt


def test_short_row_leaves_the_batch_and_its_cache_while_a_long_one_goes_on(loaded):
    short = Request(loaded, PROMPTS[0], max_new_tokens=2)
    long = Request(loaded, PROMPTS[3], max_new_tokens=12, min_new_tokens=12)
    batch = DecodeBatch(loaded.model)
    batch.add([short.row, long.row])
    batch.step()
    assert short.completion.finish_reason == "length" and short.completion.completion_tokens == 2
    assert batch.rows == [long.row] and batch.cache.layers[0].keys.shape[0] == 1 and batch.mask.shape[0] == 1
    assert batch.mask.shape[1] == len(long.prompt) + 1  # the short prompt's padding columns are gone too
    decode(batch, {0: []})
    assert long.completion.finish_reason == "length" and long.completion.completion_tokens == 12
    assert long.completion == long.alone()


def test_stop_strings_apply_to_their_own_row(loaded):
    plain = Request(loaded, PROMPTS[2], max_new_tokens=12)
    whole = plain.alone().text
    stop = whole[3:6]
    stopped = Request(loaded, PROMPTS[2], max_new_tokens=12, stop=(stop,))
    decode(DecodeBatch(loaded.model), {0: [plain, stopped]})
    assert plain.completion.text == whole
    assert stopped.completion.text == whole[: whole.find(stop)] and stopped.completion.finish_reason == "stop"
    assert stopped.completion == stopped.alone()


def test_cancelled_row_stops_and_the_others_are_unchanged(loaded):
    leaving, staying = (Request(loaded, text, max_new_tokens=12, min_new_tokens=12) for text in PROMPTS[:2])
    batch = DecodeBatch(loaded.model)
    batch.add([leaving.row, staying.row])
    batch.step()
    leaving.cancel.set()
    batch.step()
    assert leaving.completion.finish_reason == "cancelled" and leaving.completion.completion_tokens == 2
    assert batch.rows == [staying.row]
    decode(batch, {0: []})
    assert staying.completion == staying.alone()


def test_min_tokens_holds_back_an_end_of_sequence_token(loaded):
    first = Request(loaded, PROMPTS[1], max_new_tokens=1).alone()
    token = loaded.tokenizer.encode(first.text, add_special_tokens=False)[0]
    ends = Request(loaded, PROMPTS[1], eos_ids=[token])  # its first greedy token now ends the answer
    held = Request(loaded, PROMPTS[1], eos_ids=[token], min_new_tokens=4, max_new_tokens=4)
    decode(DecodeBatch(loaded.model), {0: [ends, held]})
    assert (ends.completion.finish_reason, ends.completion.completion_tokens, ends.completion.text) == ("stop", 1, "")
    assert held.completion.finish_reason == "length" and held.completion.completion_tokens == 4


def test_seeded_sampling_does_not_depend_on_the_rest_of_the_batch(loaded):
    def sampled(seed: int) -> Request:
        return Request(loaded, PROMPTS[0], temperature=1.0, top_p=0.9, seed=seed, max_new_tokens=8)

    alone, batched, other_seed = sampled(7), sampled(7), sampled(8)
    decode(DecodeBatch(loaded.model), {0: [alone]})
    decode(DecodeBatch(loaded.model), {0: [Request(loaded, PROMPTS[3]), batched, other_seed]})
    assert alone.completion == batched.completion
    assert other_seed.completion.text != alone.completion.text


@pytest.mark.parametrize("method", ["prefix", "ptuning"])
def test_prompt_learning_adapter_rows_equal_each_prompt_alone(loaded, tiny_model, method, logits_seen):
    """Virtual tokens in the cache (prefix) or in the input embeddings (P-tuning) batch like prompt tokens."""
    from conftest import prompt_adapter_with_random_tokens

    model = prompt_adapter_with_random_tokens(tiny_model, method)
    adapted = LoadedModel(model, loaded.tokenizer, loaded.template, "adapted", str(tiny_model), None)
    requests = [Request(adapted, text, max_new_tokens=6) for text in PROMPTS[:3]]
    decode(DecodeBatch(model), {0: requests[:2], 2: requests[2:]})
    for request in requests:
        assert request.completion == request.alone(), request.prompt
        sequence = torch.tensor([request.prompt + request.row.stream.detokenizer.ids])
        with torch.no_grad():  # peft's own forward (the training layout), and the base model without the adapter
            logits = model(input_ids=sequence).logits[0, -sequence.shape[1] :]  # P-tuning: drop virtual tokens
            base = loaded.model(input_ids=sequence).logits[0]
        expected = logits[len(request.prompt) - 1 : -1]
        got = torch.stack(logits_seen[id(request.row)])
        assert torch.allclose(got, expected, atol=1e-4), request.prompt
        assert not torch.allclose(got, base[len(request.prompt) - 1 : -1], atol=1e-2)  # the adapter is applied


def test_pool_switches_between_a_prefix_adapter_and_the_base(loaded, tiny_model, tmp_path, logits_seen):
    """A prompt-learning adapter has no layers to disable: the base id generates with the plain model."""
    from peft import PrefixTuningConfig, get_peft_model

    from tunelab.serve.engine import ModelPool

    torch.manual_seed(0)
    model = get_peft_model(load_for_eval(str(tiny_model), dtype="fp32").model,
                           PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    model.save_pretrained(tmp_path / "prefix")
    model.eval()
    pool = ModelPool(str(tiny_model), [f"pre={tmp_path / 'prefix'}"], base_id="tiny", dtype="fp32", device="cpu")
    prompt = torch.tensor([loaded.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        want = {"pre": model(input_ids=prompt).logits[0, -1], "tiny": loaded.model(input_ids=prompt).logits[0, -1]}
    assert not torch.allclose(want["pre"], want["tiny"], atol=1e-2)
    requests = []
    for model_id in ("pre", "tiny", "pre"):
        pool.activate(model_id)
        request = Request(loaded, PROMPTS[0], max_new_tokens=2)
        decode(DecodeBatch(pool.generation_model()), {0: [request]})
        requests.append(request)
        assert torch.allclose(logits_seen[id(request.row)][0], want[model_id], atol=1e-4), model_id


@pytest.mark.parametrize("max_rows", [1, 8])
def test_both_engines_answer_like_generate_alone(loaded, tiny_model, max_rows):
    """The engines behind the scheduler: one generate per request in threads (``--max-batch-size 1``) and the
    batching thread; four concurrent requests (the last with two choices) get the answers of generate alone."""
    import asyncio

    from tunelab.serve.engine import Job, ModelPool, build_engine

    pool = ModelPool(str(tiny_model), [], base_id="tiny", dtype="fp32", device="cpu")
    requests = [Request(loaded, text, max_new_tokens=4 + i) for i, text in enumerate(PROMPTS)]

    async def serve() -> list[list[Completion]]:
        engine, scheduler = build_engine(pool, max_concurrency=4, max_queue=4, max_batch_size=max_rows)
        jobs = []
        for i, request in enumerate(requests):
            n = 2 if i == 3 and max_rows > 1 else 1
            await scheduler.acquire("tiny", rows=n)
            job = Job(asyncio.get_running_loop(), scheduler, "tiny", pool.column("tiny"), request.prompt,
                      request.options, n=n, stops=())
            engine.start(job)
            jobs.append(job)
        assert scheduler.running == len(requests)  # all admitted at once, threads or batch
        answers = [await job.wait() for job in jobs]
        assert scheduler.running == scheduler.running_rows == 0 and scheduler.stats.completed == len(requests)
        return answers

    answers = asyncio.run(serve())
    for request, completions in zip(requests, answers, strict=True):
        assert all(c == request.alone() for c in completions), request.prompt
    assert [len(c) for c in answers] == [1, 1, 1, 2 if max_rows > 1 else 1]
