"""bf16 weights with fp32 masters in the optimizer (``train.master_weights: optimizer``): the mechanics."""

import pytest
import torch

from tunelab.errors import ConfigError, RunError
from tunelab.train.master_weights import (
    MASTER_FILE,
    MasterWeights,
    MasterWeightsChoice,
    decide_master_weights,
    tensor_to_check,
)


def bf16_model(value: float = 1.0) -> torch.nn.Module:
    model = torch.nn.Linear(4, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def backward_with_gradient(model: torch.nn.Module, gradient: float) -> None:
    # d(sum(w * c))/dw = c: each backward adds exactly `gradient` to every weight's gradient
    (model.weight * torch.full((1, 4), gradient, dtype=torch.bfloat16)).sum().backward()


def test_gradients_are_summed_in_fp32_and_leave_the_bf16_weights():
    model = bf16_model()
    masters = MasterWeights(model)
    backward_with_gradient(model, 1.0)
    backward_with_gradient(model, 1e-3)  # in bf16, 1.0 + 0.001 rounds back to 1.0
    master = masters.masters[0]
    assert model.weight.grad is None
    assert master.dtype == torch.float32
    expected = torch.tensor(1.0) + torch.tensor(1e-3, dtype=torch.bfloat16).float()
    assert torch.equal(master.grad, torch.full((1, 4), expected.item()))
    bf16_sum = torch.tensor(1.0, dtype=torch.bfloat16) + torch.tensor(1e-3, dtype=torch.bfloat16)
    assert bf16_sum.item() == 1.0 and master.grad[0, 0].item() != 1.0  # what summing in bf16 would have lost


def test_updates_below_bf16_resolution_accumulate_in_the_masters():
    def train(with_masters: bool) -> torch.nn.Module:
        model = bf16_model()
        masters = MasterWeights(model) if with_masters else None
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        if masters is not None:
            masters.attach(optimizer)
        for _ in range(10):
            backward_with_gradient(model, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        return model

    plain, mastered = train(False), train(True)
    # each step moves the weight by 0.001, under half of bf16's spacing at 1.0: plain bf16 SGD never moves
    assert torch.all(plain.weight == 1.0)
    master = tensor_to_check(mastered.weight)
    assert torch.allclose(master, torch.full((1, 4), 0.99), atol=1e-6)
    assert torch.equal(mastered.weight, master.to(torch.bfloat16)) and torch.all(mastered.weight < 1.0)
    assert master.grad is None  # the window's sum is dropped after the step


def test_clipping_reads_the_masters_gradients():
    model = bf16_model()
    masters = MasterWeights(model)
    backward_with_gradient(model, 3.0)
    norm = torch.nn.utils.clip_grad_norm_(masters.masters, max_norm=1.0)
    assert norm.item() == pytest.approx(6.0)  # sqrt(4 * 3^2)
    assert torch.linalg.vector_norm(masters.masters[0].grad).item() == pytest.approx(1.0, rel=1e-5)


def test_attach_refuses_an_optimizer_that_already_stepped():
    model = bf16_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    backward_with_gradient(model, 1.0)
    optimizer.step()
    with pytest.raises(RunError, match="has already stepped"):
        MasterWeights(model).attach(optimizer)


def test_save_and_load_restore_the_exact_fp32_values(tmp_path):
    model = bf16_model()
    masters = MasterWeights(model)
    with torch.no_grad():
        masters.masters[0].fill_(0.123456789)
    masters.save(tmp_path)
    assert (tmp_path / MASTER_FILE).is_file()
    other = bf16_model(5.0)
    restored = MasterWeights(other)
    assert restored.load(tmp_path)
    assert torch.equal(restored.masters[0], masters.masters[0])
    assert torch.equal(other.weight, masters.masters[0].to(torch.bfloat16))
    assert not MasterWeights(bf16_model()).load(tmp_path / "elsewhere")


def test_release_gives_the_gradients_back_to_the_weights():
    model = bf16_model()
    masters = MasterWeights(model)
    masters.release()
    backward_with_gradient(model, 1.0)
    assert model.weight.grad is not None and masters.masters[0].grad is None
    assert tensor_to_check(model.weight) is model.weight


def test_only_bf16_trained_weights_get_masters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2).to(torch.bfloat16), torch.nn.Linear(2, 2))
    model[0].bias.requires_grad_(False)
    masters = MasterWeights(model)
    assert masters.names == ["0.weight"]


@pytest.mark.parametrize(("dtype", "env", "message"), [
    ("fp32", {}, "train.master_weights: 'optimizer' needs bf16 weights, but model.dtype resolved to fp32"),
    ("bf16", {"WORLD_SIZE": "2"}, "train.master_weights: 'optimizer' runs in a single process"),
    ("bf16", {"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed's bf16"),  # one process, but DeepSpeed's own masters
])
def test_an_explicit_optimizer_setting_the_run_cannot_honour_is_refused(dtype, env, message):
    with pytest.raises(ConfigError, match=message):
        decide_master_weights("optimizer", dtype, env=env, cuda_devices=1, resume_from=None)
    assert decide_master_weights("optimizer", "bf16", env={}, cuda_devices=0, resume_from=None).in_optimizer


def test_auto_picks_the_masters_only_for_bf16_on_one_cuda_process(tmp_path):
    def decide(dtype="bf16", env=None, gpus=1, resume_from=None):
        return decide_master_weights("auto", dtype, env=env or {}, cuda_devices=gpus, resume_from=resume_from)

    chosen = decide()
    assert chosen.in_optimizer and chosen.reason.startswith("auto: bf16 on one CUDA GPU")
    assert decide(env={"WORLD_SIZE": ""}).in_optimizer  # an empty variable is no launch
    # several GPUs and no launcher: training runs on cuda:0 alone (test_train_settings), so one GPU all the same
    assert decide(gpus=2).in_optimizer
    for choice, reason in [(decide(dtype="fp32"), "auto: fp32 weights"),
                           (decide(dtype="fp16"), "auto: fp16 weights"),
                           (decide(gpus=0), "auto: no CUDA GPU"),
                           (decide(env={"WORLD_SIZE": "4"}), "auto: a multi-process or sharded launch"),
                           (decide(env={"ACCELERATE_USE_FSDP": "1"}), "auto: a multi-process or sharded launch"),
                           (decide(env={"ACCELERATE_USE_DEEPSPEED": "True"}), "auto: a multi-process or sharded")]:
        assert not choice.in_optimizer and choice.reason.startswith(reason), choice
    # resuming: a checkpoint written with fp32 weights stays with them (the masters' mode would refuse it)
    written_with_fp32 = tmp_path / "checkpoint-3"
    written_with_fp32.mkdir()
    assert decide(resume_from=written_with_fp32).reason == "auto: resuming checkpoint-3, written with fp32 weights"
    (written_with_fp32 / MASTER_FILE).write_bytes(b"")
    assert decide(resume_from=written_with_fp32).in_optimizer
    adapters = tmp_path / "checkpoint-5"  # hybrid's LoRA phase: nothing bf16 trains, no rule about fp32 weights
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    assert decide(resume_from=adapters).in_optimizer
    assert not decide_master_weights("params", "bf16", env={}, cuda_devices=1, resume_from=None).in_optimizer


def test_the_summary_record_says_none_where_nothing_bf16_trains():
    from tunelab.train.master_weights import master_weights_record

    auto = MasterWeightsChoice(True, "auto: bf16 on one CUDA GPU in one process")
    assert master_weights_record(torch.nn.Linear(2, 2), auto)["in"] == "none"  # LoRA: adapters are fp32
    assert master_weights_record(torch.nn.Linear(2, 2).to(torch.bfloat16), auto) == {"in": "optimizer",
                                                                                     "reason": auto.reason}


def test_the_note_says_what_was_chosen_and_stays_quiet_when_nothing_changes():
    from tunelab.train.master_weights import master_weights_note

    asked = MasterWeightsChoice(True, "set by train.master_weights")
    auto = MasterWeightsChoice(True, "auto: bf16 on one CUDA GPU in one process")
    adapters, half = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16)  # fp32 trainable: adapters
    assert "changes nothing here" in master_weights_note(adapters, asked)
    assert master_weights_note(adapters, auto) == ""
    assert master_weights_note(adapters, MasterWeightsChoice(False, "auto: no CUDA GPU")) == ""
    assert master_weights_note(half, auto).startswith("master weights optimizer: 6 trained parameters stay bf16")
    assert master_weights_note(half, auto).endswith("(auto: bf16 on one CUDA GPU in one process)")
    assert master_weights_note(half, MasterWeightsChoice(False, "auto: no CUDA GPU")) == (
        "master weights params: 6 trained parameters are fp32 in the model, under bf16 autocast (auto: no CUDA GPU)")


def test_state_made_at_construction_moves_to_the_masters():
    model = bf16_model()
    optimizer = torch.optim.Adagrad(model.parameters(), lr=1e-3, initial_accumulator_value=0.5)
    assert optimizer.state[model.weight]["sum"].dtype == torch.bfloat16  # Adagrad makes its state up front
    masters = MasterWeights(model)
    masters.attach(optimizer)
    master = masters.masters[0]
    assert model.weight not in optimizer.state
    assert optimizer.state[master]["sum"].dtype == torch.float32
    backward_with_gradient(model, 1.0)
    optimizer.step()  # would raise KeyError('sum') if the state stayed keyed by the bf16 weight
    assert torch.all(master < 1.0) and master.grad is None


def test_bitsandbytes_per_weight_settings_follow_the_masters():
    class Manager:  # bitsandbytes' GlobalOptimManager keeps (module, attribute, config) and matches by identity
        def __init__(self, module):
            self.module_weight_config_triple = [(module, "weight", {"optim_bits": 32})]

    model = bf16_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    optimizer.mng = Manager(model)
    masters = MasterWeights(model)
    masters.attach(optimizer)
    matched = [config for module, attr, config in optimizer.mng.module_weight_config_triple
               if any(getattr(module, attr) is p for group in optimizer.param_groups for p in group["params"])]
    assert matched == [{"optim_bits": 32}]


def test_bitsandbytes_keeps_the_embedding_override_in_32_bits():
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(torch.nn.Embedding(300, 64), torch.nn.Linear(64, 300)).to(torch.bfloat16)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.register_module_override(model[0], "weight", {"optim_bits": 32})
    optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=16)
    masters = MasterWeights(model)
    masters.attach(optimizer)
    model[1](model[0](torch.tensor([[1, 2, 3]]))).float().sum().backward()
    optimizer.step()
    embedding, linear = masters.masters[0], masters.masters[2]
    assert optimizer.state[embedding]["state1"].dtype == torch.float32  # 32-bit, as registered
    assert optimizer.state[linear]["state1"].dtype == torch.uint8  # the rest in 8 bits
