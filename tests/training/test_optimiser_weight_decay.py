"""AdamW's weight decay reaches the weight matrices only, as open_clip's trainer decides (no decay on biases,
LayerNorm gains, the class embedding, logit_scale), and a checkpoint saved with the earlier single parameter
group (decay on everything) still resumes: its per-parameter state is carried over by parameter order."""

from __future__ import annotations

import copy

import pytest
import torch
from tinymodels import make_tiny_clip

from training import adapters
from training.optimisation import Optimisation


def named_trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def step(parameters, optimisation: Optimisation, seed: int) -> None:
    torch.manual_seed(seed)
    loss = sum((parameter * torch.randn_like(parameter)).sum() for parameter in parameters)
    optimisation.apply(loss)


@pytest.mark.parametrize("method", ["full", "last-blocks"])
def test_weight_decay_skips_biases_norms_and_embeddings_of_one_dimension(method):
    model = make_tiny_clip()
    adapters.prepare(model, method)
    named = named_trainable(model)
    optimisation = Optimisation(named, 1e-3, 0.01, 0, 10, torch.device("cpu"))
    decay_of = {id(p): group["weight_decay"] for group in optimisation.optimizer.param_groups for p in group["params"]}
    assert len(decay_of) == len(named)
    for name, parameter in named:
        excluded = parameter.ndim < 2 or "bias" in name or ".ln_" in name or name.endswith("logit_scale")
        assert decay_of[id(parameter)] == (0.0 if excluded else 0.01), name
    names = {name for name, _ in named}
    if method == "full":
        assert decay_of[id(model.visual.class_embedding)] == 0.0 and "visual.class_embedding" in names
        assert decay_of[id(model.visual.conv1.weight)] == 0.01
    assert decay_of[id(model.visual.ln_post.weight)] == 0.0 and decay_of[id(model.visual.proj)] == 0.01


def test_logit_scale_is_not_decayed():
    from training.optimisation import decays

    assert not decays("logit_scale", torch.nn.Parameter(torch.ones(3, 3)))
    assert decays("visual.transformer.resblocks.0.attn.in_proj_weight", torch.nn.Parameter(torch.ones(3, 3)))


def test_lora_parameters_are_all_decayed_in_one_group():
    model = make_tiny_clip()
    parameters = adapters.prepare(model, "lora")
    named = named_trainable(model)
    assert len(named) == len(parameters)
    optimisation = Optimisation(named, 1e-3, 0.01, 0, 10, torch.device("cpu"))
    assert [group["weight_decay"] for group in optimisation.optimizer.param_groups] == [0.01]


def test_a_single_group_checkpoint_resumes_into_the_two_groups():
    model = make_tiny_clip()
    adapters.prepare(model, "last-blocks")
    named = named_trainable(model)
    parameters = [parameter for _, parameter in named]
    # The state a checkpoint of the earlier code holds: one AdamW group over the parameters in order.
    old = Optimisation(named, 1e-3, 0.01, 2, 10, torch.device("cpu"))
    old.optimizer = torch.optim.AdamW(parameters, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    old.scheduler = torch.optim.lr_scheduler.LambdaLR(old.optimizer, old.scheduler.lr_lambdas[0])
    for seed in range(3):
        step(parameters, old, seed)
    saved = copy.deepcopy(old.state())
    assert len(saved["optimizer"]["param_groups"]) == 1
    old_state = {id(p): old.optimizer.state[p] for p in parameters}

    resumed = Optimisation(named, 1e-3, 0.01, 2, 10, torch.device("cpu"))
    resumed.restore(saved)
    groups = resumed.optimizer.param_groups
    assert [group["weight_decay"] for group in groups] == [0.01, 0.0]
    for parameter in parameters:
        state = resumed.optimizer.state[parameter]
        assert torch.equal(state["exp_avg"], old_state[id(parameter)]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], old_state[id(parameter)]["exp_avg_sq"])
    assert all(group["lr"] == pytest.approx(old.learning_rate) for group in groups)
    step(parameters, resumed, 9)  # and the schedule moves both groups on
    assert groups[0]["lr"] == groups[1]["lr"] == pytest.approx(resumed.learning_rate)
    assert resumed.scheduler.last_epoch == 4


def test_a_checkpoint_of_other_parameters_is_refused_in_one_sentence():
    from backend.engine.errors import InputError

    model = make_tiny_clip()
    adapters.prepare(model, "last-blocks")
    named = named_trainable(model)
    parameters = [parameter for _, parameter in named]
    old = Optimisation(named, 1e-3, 0.01, 0, 10, torch.device("cpu"))
    old.optimizer = torch.optim.AdamW(parameters[:-1], lr=1e-3)
    old.scheduler = torch.optim.lr_scheduler.LambdaLR(old.optimizer, lambda s: 1.0)
    with pytest.raises(InputError, match="cannot be resumed"):
        Optimisation(named, 1e-3, 0.01, 0, 10, torch.device("cpu")).restore(old.state())
