"""Export a run as a standard Hugging Face model folder that plain transformers, vLLM and llama.cpp load.

A LoRA/DoRA adapter is merged into its base (peft ``merge_and_unload``); a full or freeze run is already whole.
Either way the weights are cast to the export dtype and written as sharded safetensors with the config, the
tokenizer, a chat template that renders the prompts the run trained on, and a generation config whose
``eos_token_id`` lists the template's end-of-turn tokens.

Nothing is trusted unchecked, on a few prompts rendered by the run's template:

1. merge: the merged fp32 model's logits against base + adapter (unmerged, fp32), within ``MERGE_RTOL`` of the
   largest logit: catches a wrong merge (scaling, DoRA magnitude, a module left out);
2. reload: the folder written, loaded back by plain ``AutoModelForCausalLM``, holds bit for bit the tensors that
   were saved (a digest per state-dict entry): catches missing or misnamed tensors and broken weight ties;
3. precision: the reloaded model's logits against the fp32 reference; required within ``MERGE_RTOL`` for an fp32
   export, reported (not required) for bf16/fp16, so a user sees what the lower precision costs.

A failed check raises :class:`~tunelab.errors.ModelError`; a folder this export created is then removed, and
while it is being written its ``tunelab_export.json`` says ``"complete": false``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.data.record import Turn
from tunelab.data.tokenize import encode_prompt
from tunelab.errors import ConfigError, ModelError, RunError
from tunelab.evaluate.generate import LoadedModel, load_for_eval, stop_token_ids
from tunelab.export.chat_template import install_chat_template
from tunelab.models.load import DTYPES

MERGE_RTOL = 1e-4
"""Allowed max |Δlogit| as a fraction of max(1, largest |logit|). fp32 merges differ from the unmerged sum only by
rounding (about 1e-6 relative); a merge bug moves logits by the adapter's whole effect."""
EXPORT_DTYPES = ("bf16", "fp16", "fp32")
MANIFEST = "tunelab_export.json"
PROMPT_LEARNING = frozenset({"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING"})
_CHECK_PROMPTS = ("Hello! What can you do?", "帮我把红色的卫衣加入购物车，要L码。", 'Reply in JSON: {"intent": "add"}')
_MAX_CHECK_TOKENS = 128


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    max_abs_diff: float | None = None
    """For logit checks: the largest |Δlogit| over every position of every prompt."""
    tolerance: float | None = None
    top1_agreement: float | None = None
    """For logit checks: the share of positions whose argmax token is the same in both."""
    required: bool = True
    """False for a measurement that is reported but cannot fail the export."""

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED" if self.required else "over tolerance (information only)"
        return f"{self.name}: {self.detail}: {verdict}"


@dataclass
class ExportReport:
    output: str
    source: str
    kind: str
    """``adapter`` (merged into its base) or ``model`` (a full/freeze run or any model folder)."""
    base: str | None
    dtype: str
    shards: int
    chat_template: str
    stop_token_ids: list[int]
    stop_strings: list[str]
    """The template's end-of-turn strings; those that are not one token must be passed as ``stop`` at inference."""
    checks: list[Check] = field(default_factory=list)
    prompt_ids_match: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        return out


def export_model(
    source: str, output: str, *, base: str | None = None, dtype: str = "bf16", max_shard_size: str = "2GB",
    template: str | None = None, log: Any = print,
) -> ExportReport:
    """Merge (for an adapter), cast, write and verify; returns what was written and measured."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype: got {dtype!r}; allowed values: {', '.join(EXPORT_DTYPES)}")
    folder = Path(source)
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        kind = "adapter"
        settings = json.loads(adapter_config.read_text("utf-8"))
        if settings.get("peft_type") in PROMPT_LEARNING:
            raise ModelError(f"--adapter {source}: a {settings['peft_type']} adapter adds virtual tokens, not weight "
                             "deltas, so it cannot be merged; serve it as an adapter (tunelab serve --adapter)")
        base = base or settings.get("base_model_name_or_path")
        if not base:
            raise ModelError(f"--adapter {source}: adapter_config.json names no base_model_name_or_path; pass --base")
    elif (folder / "config.json").is_file():
        kind = "model"
        if base is not None:
            raise ConfigError(f"--base: only for adapters, and {source} is a whole model (a full or freeze run)")
    else:
        raise ModelError(f"--adapter {source}: neither adapter_config.json nor config.json there "
                         "(expected a LoRA/DoRA run or adapter folder, or a full/freeze run folder)")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise RunError(f"-o {output}: the folder is not empty; choose a new one")

    model_path, adapter = (base, source) if base is not None else (source, None)
    log(f"loading {f'base {base} + adapter {source}' if adapter else source} in fp32")
    loaded = load_for_eval(model_path, adapter, template=template, dtype="fp32")
    prompts = check_prompts(loaded, folder)
    reference = prompt_logits(loaded.model, prompts)
    checks: list[Check] = []
    model = loaded.model
    if kind == "adapter":
        model = model.merge_and_unload(safe_merge=True)
        checks.append(_require(compare_logits("merge (merged fp32 vs base + adapter)", reference,
                                              prompt_logits(model, prompts)), source))
    model = model.to(DTYPES[dtype])
    saved = tensor_digests(model)
    template_source = install_chat_template(loaded.template, loaded.tokenizer)
    stops = stop_token_ids(loaded)
    out.mkdir(parents=True, exist_ok=True)
    try:
        (out / MANIFEST).write_text(json.dumps({"complete": False}), "utf-8")
        model.generation_config.eos_token_id = stops
        model.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
        model.save_pretrained(str(out), max_shard_size=max_shard_size)
        loaded.tokenizer.save_pretrained(str(out))
        del model, loaded.model  # one copy of the weights in memory at a time
        reloaded = _load_plain(out, dtype)
        checks.append(_require(compare_digests(saved, tensor_digests(reloaded)), source))
        precision = compare_logits(f"precision (written {dtype} folder vs fp32 reference)", reference,
                                   prompt_logits(reloaded, prompts), required=dtype == "fp32")
        checks.append(_require(precision, source))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    report = ExportReport(
        output=str(out), source=source, kind=kind, base=base, dtype=dtype,
        shards=len(list(out.glob("model*.safetensors"))), chat_template=template_source, stop_token_ids=stops,
        stop_strings=list(loaded.template.stop_strings), checks=checks,
        prompt_ids_match=_compare_prompt_ids(loaded, out, folder),
    )
    (out / MANIFEST).write_text(json.dumps({"complete": True, **report.to_json()}, indent=2, ensure_ascii=False),
                                "utf-8")
    for check in checks:
        log(check.describe())
    return report


def check_prompts(loaded: LoadedModel, run_folder: Path) -> list[list[int]]:
    """Prompt ids to compare logits on: fixed questions plus up to two from the run's held-out test split."""
    questions = list(_CHECK_PROMPTS)
    test_file = run_folder / "test.jsonl"
    if test_file.is_file():
        for line in test_file.read_text("utf-8").splitlines()[:2]:
            user = [m["content"] for m in json.loads(line).get("messages", []) if m.get("role") == "user"]
            questions += user[:1]
    return [encode_prompt(loaded.template, loaded.tokenizer, None, [Turn("user", q)])[-_MAX_CHECK_TOKENS:]
            for q in questions]


@torch.no_grad()
def prompt_logits(model: Any, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits at every position of each prompt, in fp32 on the CPU (one prompt at a time: no padding effects)."""
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in prompts]


def compare_logits(
    name: str, reference: list[torch.Tensor], other: list[torch.Tensor], *, required: bool = True
) -> Check:
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    tolerance = MERGE_RTOL * scale
    diff = max(float((r - o).abs().max()) for r, o in zip(reference, other, strict=True))
    same = sum(int((r.argmax(-1) == o.argmax(-1)).sum()) for r, o in zip(reference, other, strict=True))
    agreement = same / sum(r.shape[0] for r in reference)
    detail = (f"max |Δlogit| {diff:.3g} (tolerance {tolerance:.3g} = {MERGE_RTOL:g} x max(1, max |logit|)), "
              f"same top-1 token at {100 * agreement:.1f}% of {len(reference)} prompts' positions")
    return Check(name=name, passed=diff <= tolerance, detail=detail, max_abs_diff=diff, tolerance=tolerance,
                 top1_agreement=agreement, required=required)


def tensor_digests(model: Any) -> dict[str, str]:
    """A digest of every state-dict tensor's bytes (dtype and shape included), by name."""
    out = {}
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        digest = hashlib.blake2b(f"{data.dtype}{tuple(data.shape)}".encode(), digest_size=16)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        out[name] = digest.hexdigest()
    return out


def compare_digests(saved: dict[str, str], reloaded: dict[str, str]) -> Check:
    missing = sorted(set(saved) - set(reloaded))
    extra = sorted(set(reloaded) - set(saved))
    changed = sorted(name for name in set(saved) & set(reloaded) if saved[name] != reloaded[name])
    problems = [f"{label} {names[:3]}{' ...' if len(names) > 3 else ''}"
                for label, names in (("missing", missing), ("unexpected", extra), ("different", changed)) if names]
    detail = "; ".join(problems) if problems else f"all {len(saved)} tensors identical bit for bit"
    return Check(name="reload (written folder vs the tensors saved)", passed=not problems, detail=detail)


def _require(check: Check, source: str) -> Check:
    if check.required and not check.passed:
        raise ModelError(f"export of {source} failed verification: {check.describe()}; nothing was written")
    return check


def _load_plain(out: Path, dtype: str) -> Any:
    """The written folder, loaded the way a user without tunelab loads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=DTYPES[dtype])


def _compare_prompt_ids(loaded: LoadedModel, out: Path, run_folder: Path) -> str:
    """Whether plain ``apply_chat_template`` on the written tokenizer gives tunelab's prompt ids, as a sentence.

    The text is checked equal before saving; ids can still differ when a template boundary falls inside what
    the tokenizer would merge into one token (tunelab encodes template segments one by one).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    prompts = check_prompts(loaded, run_folder)
    questions = list(_CHECK_PROMPTS)
    same = 0
    for question, ids in zip(questions, prompts, strict=False):
        plain = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True,
                                              add_generation_prompt=True, return_dict=False)
        same += int(list(plain)[-_MAX_CHECK_TOKENS:] == ids)
    return f"{same}/{len(questions)} check prompts: apply_chat_template gives tunelab's prompt token ids"
